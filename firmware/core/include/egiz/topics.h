// MQTT topics of one node, from the prefix the gateway hands over at provisioning
// ("openegiz/{site}/{type}/{id}", the status topic without its last level) or built from its parts:
//   {prefix}/{feature}/telemetry   {prefix}/status   {prefix}/cmd   {prefix}/cmd/ack
#pragma once

#include <string>

namespace egiz {

std::string topic_prefix(const std::string& site, const std::string& type, const std::string& id);
std::string telemetry_topic(const std::string& prefix, const std::string& feature);
std::string status_topic(const std::string& prefix);
std::string command_topic(const std::string& prefix);
std::string ack_topic(const std::string& prefix);

// A value the gateway accepts in a placeholder level ({site}, {type}, {equipment_id}):
// 1-64 characters of A-Z a-z 0-9 _ - .
bool valid_level(const std::string& s);

// A prefix the node can publish under: 1-200 bytes, levels separated by '/', none empty, and no
// wildcard ('+', '#') or NUL anywhere.
bool valid_topic_prefix(const std::string& s);

}  // namespace egiz
