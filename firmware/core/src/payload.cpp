#include "egiz/payload.h"

#include <cmath>

#include "egiz/json.h"

namespace egiz {

Value Value::of(double v) {
  Value x;
  x.number = v;
  return x;
}
Value Value::of_text(std::string v) {
  Value x;
  x.kind = Kind::Text;
  x.text = std::move(v);
  return x;
}
Value Value::of_flag(bool v) {
  Value x;
  x.kind = Kind::Flag;
  x.flag = v;
  return x;
}
Value Value::of_numbers(std::vector<double> v) {
  Value x;
  x.kind = Kind::Numbers;
  x.numbers = std::move(v);
  return x;
}
Value Value::of_named(std::vector<std::pair<std::string, double>> v) {
  Value x;
  x.kind = Kind::Named;
  x.named = std::move(v);
  return x;
}

bool valid_name(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    char c = name[i];
    bool letter = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || c == '_';
    if (!letter && (i == 0 || !(c >= '0' && c <= '9'))) return false;
  }
  return true;
}

bool check_properties(const Properties& props, std::string& error) {
  if (props.empty() || props.size() > kMaxProperties) {
    error = "a sample needs 1-" + std::to_string(kMaxProperties) + " properties";
    return false;
  }
  for (size_t i = 0; i < props.size(); ++i) {
    const std::string& name = props[i].first;
    const Value& v = props[i].second;
    if (!valid_name(name)) return (error = "property name '" + name + "' is not allowed"), false;
    for (size_t k = 0; k < i; ++k)
      if (props[k].first == name) return (error = "property " + name + " appears twice"), false;
    switch (v.kind) {
      case Value::Kind::Number:
        if (!std::isfinite(v.number)) return (error = name + " is not a finite number"), false;
        break;
      case Value::Kind::Text:
        if (utf8_length(v.text) > kMaxStringChars)
          return (error = name + " is longer than " + std::to_string(kMaxStringChars) + " characters"), false;
        break;
      case Value::Kind::Flag:
        break;
      case Value::Kind::Numbers:
        if (v.numbers.empty() || v.numbers.size() > kMaxArray)
          return (error = name + " must have 1-" + std::to_string(kMaxArray) + " numbers"), false;
        for (double x : v.numbers)
          if (!std::isfinite(x)) return (error = name + " holds a number that is not finite"), false;
        break;
      case Value::Kind::Named:
        if (v.named.empty() || v.named.size() > kMaxNamed)
          return (error = name + " must have 1-" + std::to_string(kMaxNamed) + " named numbers"), false;
        for (size_t k = 0; k < v.named.size(); ++k) {
          if (!valid_name(v.named[k].first) || !std::isfinite(v.named[k].second))
            return (error = name + "." + v.named[k].first + " must be a finite number with a plain name"), false;
          for (size_t j = 0; j < k; ++j)
            if (v.named[j].first == v.named[k].first)
              return (error = name + "." + v.named[k].first + " appears twice"), false;
        }
        break;
    }
  }
  return true;
}

Properties without_failed_values(const Properties& props, size_t* dropped) {
  Properties out;
  size_t left_out = 0;
  for (const auto& p : props) {
    const Value& v = p.second;
    if (v.kind == Value::Kind::Number && !std::isfinite(v.number)) {
      ++left_out;
      continue;
    }
    if (v.kind == Value::Kind::Numbers) {
      bool all = !v.numbers.empty();
      for (double x : v.numbers) all = all && std::isfinite(x);
      if (!all) {
        ++left_out;
        continue;
      }
    }
    if (v.kind == Value::Kind::Named) {
      std::vector<std::pair<std::string, double>> kept;
      for (const auto& n : v.named) {
        if (std::isfinite(n.second)) kept.push_back(n);
        else ++left_out;
      }
      if (!kept.empty()) out.emplace_back(p.first, Value::of_named(std::move(kept)));
      continue;
    }
    out.push_back(p);
  }
  if (dropped) *dropped = left_out;
  return out;
}

namespace {

std::string encode_value(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Number: return format_number(v.number);
    case Value::Kind::Text: return quote(v.text);
    case Value::Kind::Flag: return v.flag ? "true" : "false";
    case Value::Kind::Numbers: {
      std::string out = "[";
      for (size_t i = 0; i < v.numbers.size(); ++i) {
        if (i) out += ',';
        out += format_number(v.numbers[i]);
      }
      return out + "]";
    }
    case Value::Kind::Named: {
      std::string out = "{";
      for (size_t i = 0; i < v.named.size(); ++i) {
        if (i) out += ',';
        out += quote(v.named[i].first);
        out += ':';
        out += format_number(v.named[i].second);
      }
      return out + "}";
    }
  }
  return "null";
}

void sample_head(std::string& out, double ts, uint64_t seq) {
  out += "\"ts\":";
  out += format_number(ts);
  out += ",\"seq\":";
  out += std::to_string(seq);
}

}  // namespace

std::string encode_properties(const Properties& props) {
  std::string out = "{";
  for (size_t i = 0; i < props.size(); ++i) {
    if (i) out += ',';
    out += quote(props[i].first);
    out += ':';
    out += encode_value(props[i].second);
  }
  return out + "}";
}

std::string encode_sample(const EncodedSample& s, const std::string& boot) {
  std::string out = "{";
  sample_head(out, s.ts, s.seq);
  out += ",\"boot\":";
  out += quote(boot);
  out += ",\"properties\":";
  out += s.properties;
  return out + "}";
}

std::string encode_sample(const Sample& s, const std::string& boot) {
  return encode_sample(EncodedSample{s.ts, s.seq, encode_properties(s.properties)}, boot);
}

std::string encode_batch(const std::vector<EncodedSample>& samples, const std::string& boot) {
  std::string out = "{\"boot\":" + quote(boot) + ",\"samples\":[";
  for (size_t i = 0; i < samples.size(); ++i) {
    out += i ? ",{" : "{";
    sample_head(out, samples[i].ts, samples[i].seq);
    out += ",\"properties\":";
    out += samples[i].properties;
    out += '}';
  }
  return out + "]}";
}

std::string encode_batch(const std::vector<Sample>& samples, const std::string& boot) {
  std::vector<EncodedSample> encoded;
  encoded.reserve(samples.size());
  for (const auto& s : samples) encoded.push_back({s.ts, s.seq, encode_properties(s.properties)});
  return encode_batch(encoded, boot);
}

std::string encode_status(bool online, const std::string& fw, double ts) {
  std::string out = std::string("{\"state\":") + (online ? "\"online\"" : "\"offline\"") + ",\"fw\":" + quote(fw);
  if (ts >= 0 && std::isfinite(ts)) out += ",\"ts\":" + format_number(ts);
  return out + "}";
}

std::string encode_ack(const Ack& ack) {
  std::string out = "{\"cmdId\":" + quote(ack.cmd_id) + ",\"status\":" + quote(ack.status);
  if (!ack.properties.empty()) out += ",\"properties\":" + encode_properties(ack.properties);
  if (!ack.detail.empty()) out += ",\"detail\":" + quote(ack.detail);
  return out + "}";
}

std::vector<Point> flatten(const Properties& props) {
  std::vector<Point> out;
  for (const auto& p : props) {
    const Value& v = p.second;
    if (v.kind == Value::Kind::Numbers) {
      for (size_t i = 0; i < v.numbers.size(); ++i)
        out.push_back({p.first + "[" + std::to_string(i) + "]", Value::of(v.numbers[i])});
    } else if (v.kind == Value::Kind::Named) {
      for (const auto& n : v.named) out.push_back({p.first + "." + n.first, Value::of(n.second)});
    } else {
      out.push_back({p.first, v});
    }
  }
  return out;
}

}  // namespace egiz
