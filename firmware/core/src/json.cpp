#include "egiz/json.h"

#include <clocale>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace egiz {

const Json* Json::get(const std::string& key) const {
  if (type != Type::Object) return nullptr;
  for (const auto& m : members)
    if (m.first == key) return &m.second;
  return nullptr;
}

namespace {

// Length of the valid UTF-8 sequence at s[i] (its code point in `cp`), or 0 when it is invalid
// (overlong forms, surrogates and values beyond U+10FFFF included).
size_t utf8_at(const std::string& s, size_t i, unsigned& cp) {
  auto byte = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned c = byte(i);
  if (c < 0x80) {
    cp = c;
    return 1;
  }
  size_t n;
  unsigned lo = 0x80, hi = 0xBF;  // the allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    n = 2;
    cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    n = 3;
    cp = c & 0x0F;
    if (c == 0xE0) lo = 0xA0;  // no overlong forms
    if (c == 0xED) hi = 0x9F;  // no UTF-16 surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    n = 4;
    cp = c & 0x07;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;  // nothing above U+10FFFF
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    unsigned b = byte(i + k);
    if (k == 1 ? (b < lo || b > hi) : (b < 0x80 || b > 0xBF)) return 0;
    cp = (cp << 6) | (b & 0x3F);
  }
  return n;
}

void append_utf8(std::string& out, unsigned cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }

// End of the JSON number grammar starting at s[i] (-?(0|[1-9]d*)(.d+)?([eE][+-]?d+)?), or npos.
size_t scan_number(const std::string& s, size_t i) {
  if (i < s.size() && s[i] == '-') ++i;
  if (i < s.size() && s[i] == '0') {
    ++i;
  } else if (i < s.size() && s[i] >= '1' && s[i] <= '9') {
    while (i < s.size() && is_digit(s[i])) ++i;
  } else {
    return std::string::npos;
  }
  if (i < s.size() && s[i] == '.') {
    ++i;
    if (i >= s.size() || !is_digit(s[i])) return std::string::npos;
    while (i < s.size() && is_digit(s[i])) ++i;
  }
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
    if (i >= s.size() || !is_digit(s[i])) return std::string::npos;
    while (i < s.size() && is_digit(s[i])) ++i;
  }
  return i;
}

// The C library reads and writes numbers with the locale's decimal point; JSON always uses '.'.
std::string locale_point() {
  const std::lconv* lc = std::localeconv();
  return (lc && lc->decimal_point && *lc->decimal_point) ? lc->decimal_point : ".";
}

struct Parser {
  const std::string& s;
  size_t i;
  int max_depth;
  std::string error;

  bool fail(const char* what) {
    if (error.empty()) error = std::string(what) + " at byte " + std::to_string(i);
    return false;
  }
  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  }
  bool literal(const char* word) {
    size_t n = std::strlen(word);
    if (s.compare(i, n, word) != 0) return fail("unexpected character");
    i += n;
    return true;
  }
  bool hex4(unsigned& out) {
    if (i + 4 > s.size()) return fail("short \\u escape");
    out = 0;
    for (int k = 0; k < 4; ++k) {
      char c = s[i++];
      out <<= 4;
      if (c >= '0' && c <= '9') out |= static_cast<unsigned>(c - '0');
      else if (c >= 'a' && c <= 'f') out |= static_cast<unsigned>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') out |= static_cast<unsigned>(c - 'A' + 10);
      else return fail("bad \\u escape");
    }
    return true;
  }
  bool string(std::string& out) {
    ++i;  // the opening quote
    while (i < s.size()) {
      unsigned char c = static_cast<unsigned char>(s[i]);
      if (c == '"') {
        ++i;
        return true;
      }
      if (c < 0x20) return fail("control character in string");
      if (c != '\\') {
        unsigned cp = 0;
        size_t n = utf8_at(s, i, cp);
        if (n == 0) return fail("invalid UTF-8");
        out.append(s, i, n);
        i += n;
        continue;
      }
      if (++i >= s.size()) break;
      char e = s[i++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = 0;
          if (!hex4(cp)) return false;
          if (cp >= 0xD800 && cp <= 0xDBFF) {  // a surrogate pair
            unsigned low = 0;
            if (s.compare(i, 2, "\\u") != 0) return fail("lone surrogate");
            i += 2;
            if (!hex4(low) || low < 0xDC00 || low > 0xDFFF) return fail("lone surrogate");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return fail("lone surrogate");
          }
          append_utf8(out, cp);
          break;
        }
        default:
          --i;
          return fail("bad escape");
      }
    }
    return fail("unterminated string");
  }
  bool number(double& out) {
    size_t end = scan_number(s, i);
    if (end == std::string::npos) return fail("bad number");
    if (!read_number(s.substr(i, end - i), out)) return fail("number out of range");
    i = end;
    return true;
  }
  bool value(Json& out, int depth) {
    if (depth > max_depth) return fail("nested too deeply");
    ws();
    if (i >= s.size()) return fail("unexpected end");
    char c = s[i];
    if (c == '{') {
      out.type = Json::Type::Object;
      ++i;
      ws();
      if (i < s.size() && s[i] == '}') {
        ++i;
        return true;
      }
      while (true) {
        ws();
        if (i >= s.size() || s[i] != '"') return fail("expected a key");
        std::string key;
        if (!string(key)) return false;
        if (out.get(key)) return fail("duplicate key");
        ws();
        if (i >= s.size() || s[i] != ':') return fail("expected ':'");
        ++i;
        out.members.emplace_back(std::move(key), Json());
        if (!value(out.members.back().second, depth + 1)) return false;
        ws();
        if (i < s.size() && s[i] == ',') {
          ++i;
          continue;
        }
        if (i < s.size() && s[i] == '}') {
          ++i;
          return true;
        }
        return fail("expected ',' or '}'");
      }
    }
    if (c == '[') {
      out.type = Json::Type::Array;
      ++i;
      ws();
      if (i < s.size() && s[i] == ']') {
        ++i;
        return true;
      }
      while (true) {
        out.items.emplace_back();
        if (!value(out.items.back(), depth + 1)) return false;
        ws();
        if (i < s.size() && s[i] == ',') {
          ++i;
          continue;
        }
        if (i < s.size() && s[i] == ']') {
          ++i;
          return true;
        }
        return fail("expected ',' or ']'");
      }
    }
    if (c == '"') {
      out.type = Json::Type::String;
      return string(out.text);
    }
    if (c == 't') {
      out.type = Json::Type::Bool;
      out.boolean = true;
      return literal("true");
    }
    if (c == 'f') {
      out.type = Json::Type::Bool;
      return literal("false");
    }
    if (c == 'n') return literal("null");
    out.type = Json::Type::Number;
    return number(out.number);
  }
};

}  // namespace

bool parse_json(const std::string& input, Json& out, std::string& error, int max_depth, size_t max_bytes) {
  out = Json();
  if (input.size() > max_bytes) {
    error = "input is " + std::to_string(input.size()) + " bytes, limit " + std::to_string(max_bytes);
    return false;
  }
  Parser p{input, 0, max_depth, {}};
  bool ok = p.value(out, 0);
  if (ok) {
    p.ws();
    if (p.i != input.size()) ok = p.fail("trailing characters");
  }
  if (!ok) out = Json();
  error = ok ? std::string() : p.error;
  return ok;
}

bool read_number(const std::string& text, double& out) {
  if (text.empty() || scan_number(text, 0) != text.size()) return false;
  std::string local = text;
  const std::string point = locale_point();
  if (point != ".") {
    size_t dot = local.find('.');
    if (dot != std::string::npos) local.replace(dot, 1, point);
  }
  char* end = nullptr;
  double v = std::strtod(local.c_str(), &end);
  if (end != local.c_str() + local.size() || !std::isfinite(v)) return false;
  out = v;
  return true;
}

std::string format_number(double v) {
  if (!std::isfinite(v)) return "null";
  if (v == 0) return "0";
  char buf[48];
  if (std::fabs(v) < 9007199254740992.0 && v == std::floor(v)) {  // integral and exact below 2^53
    std::snprintf(buf, sizeof buf, "%.0f", v);
    return buf;
  }
  const std::string point = locale_point();
  std::string text;
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buf, sizeof buf, "%.*g", precision, v);
    text = buf;
    if (point != ".") {
      size_t at = text.find(point);
      if (at != std::string::npos) text.replace(at, point.size(), ".");
    }
    double back;
    if (read_number(text, back) && back == v) break;
  }
  return text;
}

std::string quote(const std::string& s) {
  std::string out;
  out.reserve(s.size() + 2);
  out += '"';
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    switch (c) {
      case '"': out += "\\\""; ++i; continue;
      case '\\': out += "\\\\"; ++i; continue;
      case '\n': out += "\\n"; ++i; continue;
      case '\r': out += "\\r"; ++i; continue;
      case '\t': out += "\\t"; ++i; continue;
      default: break;
    }
    if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
      ++i;
      continue;
    }
    unsigned cp = 0;
    size_t n = utf8_at(s, i, cp);
    if (n == 0) {
      out += "\xEF\xBF\xBD";  // U+FFFD for a byte that is not valid UTF-8
      ++i;
    } else {
      out.append(s, i, n);
      i += n;
    }
  }
  out += '"';
  return out;
}

size_t utf8_length(const std::string& s) {
  size_t count = 0;
  for (size_t i = 0; i < s.size(); ++count) {
    unsigned cp = 0;
    size_t n = utf8_at(s, i, cp);
    i += n ? n : 1;
  }
  return count;
}

}  // namespace egiz
