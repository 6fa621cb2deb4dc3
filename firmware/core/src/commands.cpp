#include "egiz/commands.h"

#include <cmath>

namespace egiz {

const TypeProfile kProfiles[] = {
    {"oven", "thermal", {"thermal", "setpoint", 50.0, 300.0, 190.0}},
    {"mixer", "thermal", {"motor", "speed_rpm", 0.0, 300.0, 120.0}},
    {"conveyor", "thermal", {"drive", "speed_mps", 0.0, 2.0, 0.5}},
    {"proofer", "climate", {"climate", "setpoint", 20.0, 45.0, 36.0}},
    {"cooler", "climate", {"climate", "setpoint", -5.0, 10.0, 4.0}},
};
const size_t kProfileCount = sizeof kProfiles / sizeof kProfiles[0];

const TypeProfile* profile_for(const std::string& type) {
  for (const auto& p : kProfiles)
    if (type == p.type) return &p;
  return nullptr;
}

double round_to(double v, int decimals) {
  double scale = std::pow(10.0, decimals);
  double r = std::round(v * scale) / scale;
  return std::isfinite(r) ? r : v;
}

CommandParse parse_command(const std::string& json, Command& out, std::string& error) {
  Json doc;
  if (!parse_json(json, doc, error, 8, kMaxCommandBytes)) return CommandParse::Unanswerable;
  if (!doc.is(Json::Type::Object)) return (error = "a command must be a JSON object"), CommandParse::Unanswerable;
  const Json* id = doc.get("cmdId");
  if (!id || !id->is(Json::Type::String) || id->text.empty() || id->text.size() > 128)
    return (error = "cmdId must be a string of 1-128 bytes"), CommandParse::Unanswerable;
  Command c;
  c.cmd_id = id->text;
  out = c;  // from here on the command can be answered
  const Json* feature = doc.get("feature");
  if (!feature || !feature->is(Json::Type::String) || !valid_name(feature->text))
    return (error = "feature must be a feature name"), CommandParse::Invalid;
  c.feature = feature->text;
  out.feature = c.feature;
  const Json* desired = doc.get("desiredProperties");
  if (!desired || !desired->is(Json::Type::Object) || desired->members.empty())
    return (error = "desiredProperties must be a non-empty object"), CommandParse::Invalid;
  for (const auto& m : desired->members) {
    if (m.second.is(Json::Type::Array) || m.second.is(Json::Type::Object))
      return (error = c.feature + "." + m.first + " must be a number, a string, a boolean or null"),
             CommandParse::Invalid;
    c.desired.push_back(m);
  }
  out = c;
  error.clear();
  return CommandParse::Ok;
}

NodeSettings NodeSettings::defaults(const TypeProfile& profile) {
  NodeSettings s;
  s.interval_ms = kDefaultIntervalMs;
  s.setpoint = profile.setpoint.initial;
  return s;
}

NodeSettings NodeSettings::sanitized(const TypeProfile& profile) const {
  NodeSettings s = *this;
  if (s.interval_ms < kMinIntervalMs || s.interval_ms > kMaxIntervalMs) s.interval_ms = kDefaultIntervalMs;
  if (!std::isfinite(s.setpoint) || s.setpoint < profile.setpoint.min || s.setpoint > profile.setpoint.max)
    s.setpoint = profile.setpoint.initial;
  return s;
}

namespace {

Ack rejected(const std::string& cmd_id, std::string detail) {
  Ack a;
  a.cmd_id = cmd_id;
  a.status = "rejected";
  a.detail = std::move(detail);
  return a;
}

std::string range(double lo, double hi) { return format_number(lo) + ".." + format_number(hi); }

}  // namespace

Ack apply_command(const Command& cmd, const TypeProfile& profile, NodeSettings& settings) {
  NodeSettings next = settings;
  Properties applied;
  const Setting& sp = profile.setpoint;
  bool sampling_set = false;
  for (const auto& d : cmd.desired) {
    const std::string& name = d.first;
    const Json& v = d.second;
    const std::string what = cmd.feature + "." + name;
    bool clear = v.is(Json::Type::Null);
    if (!clear && !v.is(Json::Type::Number)) return rejected(cmd.cmd_id, what + " must be a number");
    if (cmd.feature == "sampling" && (name == "interval_ms" || name == "rate_hz")) {
      if (sampling_set) return rejected(cmd.cmd_id, "give sampling.interval_ms or sampling.rate_hz, not both");
      sampling_set = true;
      if (name == "interval_ms") {
        double ms = clear ? kDefaultIntervalMs : std::round(v.number);
        if (ms < kMinIntervalMs || ms > kMaxIntervalMs)
          return rejected(cmd.cmd_id, what + " must be a number in " + range(kMinIntervalMs, kMaxIntervalMs));
        next.interval_ms = static_cast<uint32_t>(ms);
        applied.emplace_back(name, Value::of(ms));
      } else {
        double hz = clear ? 1000.0 / kDefaultIntervalMs : v.number;
        if (!(hz >= 1.0 / 3600.0 && hz <= 10.0))
          return rejected(cmd.cmd_id, what + " must be a number in 0.000278..10");
        next.interval_ms = static_cast<uint32_t>(std::lround(1000.0 / hz));
        if (next.interval_ms < kMinIntervalMs) next.interval_ms = kMinIntervalMs;
        if (next.interval_ms > kMaxIntervalMs) next.interval_ms = kMaxIntervalMs;
        applied.emplace_back(name, Value::of(round_to(1000.0 / next.interval_ms, 6)));  // the rate now in effect
      }
    } else if (cmd.feature == sp.feature && name == sp.name) {
      double value = clear ? sp.initial : v.number;
      if (value < sp.min || value > sp.max)
        return rejected(cmd.cmd_id, what + " must be a number in " + range(sp.min, sp.max));
      next.setpoint = value;
      applied.emplace_back(name, Value::of(value));
    } else {
      return rejected(cmd.cmd_id, what + " cannot be set on " + std::string(profile.type) + " nodes");
    }
  }
  settings = next;
  Ack ok;
  ok.cmd_id = cmd.cmd_id;
  ok.properties = applied;
  return ok;
}

bool is_ota(const Command& cmd) { return cmd.feature == "ota"; }

bool parse_ota(const Command& cmd, OtaRequest& out, std::string& error) {
  if (!is_ota(cmd)) return (error = "not an update command"), false;
  OtaRequest r;
  for (const auto& d : cmd.desired) {
    if (!d.second.is(Json::Type::String))
      return (error = "ota." + d.first + " must be a string"), false;
    if (d.first == "url") r.url = d.second.text;
    else if (d.first == "sha256") r.sha256 = d.second.text;
    else return (error = "ota." + d.first + " is not known; give url and sha256"), false;
  }
  bool http = r.url.rfind("http://", 0) == 0 || r.url.rfind("https://", 0) == 0;
  if (!http || r.url.size() > 512 || r.url.size() < 10) return (error = "ota.url must be an http(s):// URL"), false;
  for (char c : r.url)
    if (static_cast<unsigned char>(c) <= 0x20 || static_cast<unsigned char>(c) >= 0x7F)
      return (error = "ota.url must be an http(s):// URL"), false;
  if (r.sha256.size() != 64) return (error = "ota.sha256 must be 64 hexadecimal digits"), false;
  for (char& c : r.sha256) {
    if (c >= 'A' && c <= 'F') c = static_cast<char>(c - 'A' + 'a');
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
      return (error = "ota.sha256 must be 64 hexadecimal digits"), false;
  }
  out = r;
  return true;
}

CommandOutcome handle_command(const std::string& payload, const TypeProfile& profile, NodeSettings& settings,
                              RecentCommands& recent, bool update_busy) {
  CommandOutcome out;
  Command cmd;
  std::string err;
  CommandParse parsed = parse_command(payload, cmd, err);
  if (parsed == CommandParse::Unanswerable) {
    out.note = "command ignored: " + err;
    return out;
  }
  if (recent.seen_before(cmd.cmd_id)) {
    out.note = "command " + cmd.cmd_id + " delivered again; already answered";
    return out;
  }
  out.answer = true;
  if (parsed == CommandParse::Invalid) {
    out.ack = rejected(cmd.cmd_id, err);
  } else if (is_ota(cmd)) {
    if (!parse_ota(cmd, out.update, err)) {
      out.ack = rejected(cmd.cmd_id, err);
    } else if (update_busy) {
      out.ack = rejected(cmd.cmd_id, "an update is already running");
    } else {
      out.answer = false;
      out.start_update = true;
      out.ack.cmd_id = cmd.cmd_id;  // for the answer once the update has finished
    }
  } else {
    out.ack = apply_command(cmd, profile, settings);
  }
  out.note = "command " + cmd.cmd_id + " (" + cmd.feature + "): " + (out.start_update ? "update started" : out.ack.status);
  return out;
}

bool RecentCommands::seen_before(const std::string& id) {
  for (const auto& k : ids_)
    if (!k.empty() && k == id) return true;
  ids_[next_] = id;
  next_ = (next_ + 1) % kKeep;
  return false;
}

}  // namespace egiz
