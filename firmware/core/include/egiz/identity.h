// Who a node is: its equipment id and type (entered in the set-up portal), MAC address, firmware
// version and boot id, as announced over mDNS (`_egiz-node._tcp`, TXT id/type/fw/mac) and served on
// GET /info; and the small JSON answers of the provisioning endpoint.
#pragma once

#include <cstdint>
#include <string>

namespace egiz {

// An equipment id the gateway accepts for a node: `^[a-z0-9][a-z0-9_-]{0,62}$` (it becomes a topic
// level, part of the Thing id `{site}:{id}` and of the node's MQTT user name `node-{id}`).
bool valid_node_id(const std::string& id);
// oven, mixer, conveyor, proofer or cooler.
bool valid_node_type(const std::string& type);

std::string format_mac(const uint8_t mac[6]);  // "24:6f:28:a1:b2:c3"
// Until someone enters one: "<type>-<last three MAC bytes>", e.g. "oven-a1b2c3", unique on a line.
std::string default_node_id(const std::string& type, const uint8_t mac[6]);

// A new boot id for every start: the boot counter kept in flash and 64 random bits, so it differs
// from every earlier boot even if one of the two repeats ("0000002a-1f2e3d4c5b6a7980").
std::string make_boot_id(uint32_t boot_count, uint32_t random_hi, uint32_t random_lo);

struct NodeInfo {
  std::string id, type, fw, mac;
  bool provisioned = false;
};
// The TXT keys as JSON for GET /info, plus whether the node holds credentials.
std::string encode_info(const NodeInfo& info);
// {"ok":true} or {"ok":false,"error":"..."}
std::string encode_http_result(bool ok, const std::string& error = std::string());

// A clock that NTP has set (the gateway refuses timestamps before 2000, and a node that never got the
// time would report 1970): anything before 2023-11-14 counts as unset.
constexpr double kMinClockEpoch = 1700000000.0;
inline bool clock_valid(double epoch_s) { return epoch_s >= kMinClockEpoch; }

}  // namespace egiz
