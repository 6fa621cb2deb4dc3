#include "egiz/identity.h"

#include <cstdio>

#include "egiz/commands.h"
#include "egiz/json.h"

namespace egiz {

bool valid_node_id(const std::string& id) {
  if (id.empty() || id.size() > 63) return false;
  for (size_t i = 0; i < id.size(); ++i) {
    char c = id[i];
    bool alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
    if (!alnum && (i == 0 || (c != '_' && c != '-'))) return false;
  }
  return true;
}

bool valid_node_type(const std::string& type) { return profile_for(type) != nullptr; }

std::string format_mac(const uint8_t mac[6]) {
  char buf[18];
  std::snprintf(buf, sizeof buf, "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]);
  return buf;
}

std::string default_node_id(const std::string& type, const uint8_t mac[6]) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "%02x%02x%02x", mac[3], mac[4], mac[5]);
  return (valid_node_type(type) ? type : std::string("node")) + "-" + buf;
}

std::string make_boot_id(uint32_t boot_count, uint32_t random_hi, uint32_t random_lo) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%08lx-%08lx%08lx", static_cast<unsigned long>(boot_count),
                static_cast<unsigned long>(random_hi), static_cast<unsigned long>(random_lo));
  return buf;
}

std::string encode_info(const NodeInfo& info) {
  return "{\"id\":" + quote(info.id) + ",\"type\":" + quote(info.type) + ",\"fw\":" + quote(info.fw) +
         ",\"mac\":" + quote(info.mac) + ",\"provisioned\":" + (info.provisioned ? "true" : "false") + "}";
}

std::string encode_http_result(bool ok, const std::string& error) {
  if (ok) return "{\"ok\":true}";
  return "{\"ok\":false,\"error\":" + quote(error) + "}";
}

}  // namespace egiz
