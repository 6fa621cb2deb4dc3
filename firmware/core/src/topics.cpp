#include "egiz/topics.h"

namespace egiz {

std::string topic_prefix(const std::string& site, const std::string& type, const std::string& id) {
  return "openegiz/" + site + "/" + type + "/" + id;
}
std::string telemetry_topic(const std::string& prefix, const std::string& feature) {
  return prefix + "/" + feature + "/telemetry";
}
std::string status_topic(const std::string& prefix) { return prefix + "/status"; }
std::string command_topic(const std::string& prefix) { return prefix + "/cmd"; }
std::string ack_topic(const std::string& prefix) { return prefix + "/cmd/ack"; }

bool valid_level(const std::string& s) {
  if (s.empty() || s.size() > 64) return false;
  for (char c : s) {
    bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-' ||
              c == '.';
    if (!ok) return false;
  }
  return true;
}

bool valid_topic_prefix(const std::string& s) {
  if (s.empty() || s.size() > 200 || s.front() == '/' || s.back() == '/') return false;
  char last = '\0';
  for (char c : s) {
    if (c == '+' || c == '#' || c == '\0') return false;
    if (c == '/' && last == '/') return false;  // an empty level
    last = c;
  }
  return true;
}

}  // namespace egiz
