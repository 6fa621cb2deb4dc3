// Commands on the node's `cmd` topic, as the gateway publishes them when a client writes desired
// properties of a feature (gateway/ingest/mqtt.py, MqttIngest.send_command):
//   {"cmdId":"6f1c...","feature":"thermal","desiredProperties":{"setpoint":210.0},"ts":1718000000.25}
// `desiredProperties` is a JSON merge patch: null means "clear this value", which the node takes as
// "back to the default". The node answers every command that has a cmdId on `cmd/ack` (payload.h, Ack):
// "ok" with the values it now reports, or "rejected" with the reason; a command with one unknown or
// out-of-range property changes nothing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "egiz/json.h"
#include "egiz/payload.h"

namespace egiz {

constexpr size_t kMaxCommandBytes = 4096;

struct Command {
  std::string cmd_id, feature;
  std::vector<std::pair<std::string, Json>> desired;  // as sent, in order
};

enum class CommandParse {
  Ok,            // a well-formed command
  Invalid,       // it has a cmdId (answer "rejected" with the error) but is otherwise malformed
  Unanswerable,  // no usable cmdId: nothing to answer to; log and drop it
};
CommandParse parse_command(const std::string& json, Command& out, std::string& error);

// One value a command may set, with its allowed range and its value at first start.
struct Setting {
  const char* feature;
  const char* name;
  double min, max, initial;
};

// What differs between equipment types: the feature the zone temperatures are published under, and
// the setpoint a command may change (the same names and ranges as the gateway's simulated machines).
struct TypeProfile {
  const char* type;
  const char* thermal_feature;
  Setting setpoint;
};
const TypeProfile* profile_for(const std::string& type);  // nullptr for an unknown type
extern const TypeProfile kProfiles[];
extern const size_t kProfileCount;

constexpr uint32_t kMinIntervalMs = 100, kMaxIntervalMs = 3600000, kDefaultIntervalMs = 1000;

// The settings commands change; kept in NVS on the node.
struct NodeSettings {
  uint32_t interval_ms = kDefaultIntervalMs;
  double setpoint = 0.0;
  static NodeSettings defaults(const TypeProfile& profile);
  // Values read back from storage, each replaced by its default when out of range.
  NodeSettings sanitized(const TypeProfile& profile) const;
};

// Apply a settings command:
//   feature "sampling": interval_ms (100..3600000) or rate_hz (1/3600..10), not both;
//   feature and name of the type's setpoint (thermal.setpoint 50..300 on an oven, ...).
// Returns the ack to send: "ok" with the applied values, or "rejected" (settings untouched).
Ack apply_command(const Command& cmd, const TypeProfile& profile, NodeSettings& settings);

// An update: {"feature":"ota","desiredProperties":{"url":"http(s)://...","sha256":"<64 hex digits>"}}.
struct OtaRequest {
  std::string url, sha256;  // sha256 in lower case
};
bool is_ota(const Command& cmd);
bool parse_ota(const Command& cmd, OtaRequest& out, std::string& error);

// The last few command ids, so a command the broker delivers twice is applied and answered once.
class RecentCommands {
 public:
  // True when `id` was seen before; otherwise remembers it.
  bool seen_before(const std::string& id);

 private:
  static constexpr size_t kKeep = 8;
  std::string ids_[kKeep];
  size_t next_ = 0;
};

// Everything the node does with one message on its `cmd` topic, short of running an update:
//  - no usable cmdId, or a cmdId seen moments ago (a redelivery): nothing to answer (`answer` false,
//    the reason in `note` for the log);
//  - malformed, unknown or out of range: answer "rejected" with the reason, settings untouched;
//  - settings: applied, answer "ok" with the values now in effect;
//  - an update (feature "ota"): `start_update` with the request, and no answer yet; the update
//    answers when it has finished ("ok" from the new image once it runs, "error" otherwise).
//    Refused while `update_busy`.
struct CommandOutcome {
  bool answer = false;
  Ack ack;
  bool start_update = false;
  OtaRequest update;
  std::string note;
};
CommandOutcome handle_command(const std::string& payload, const TypeProfile& profile, NodeSettings& settings,
                              RecentCommands& recent, bool update_busy);

// `v` rounded to `decimals` places, as the nearest double (so it prints short).
double round_to(double v, int decimals);

}  // namespace egiz
