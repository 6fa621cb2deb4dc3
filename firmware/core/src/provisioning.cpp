#include "egiz/provisioning.h"

#include <cmath>

#include "egiz/json.h"
#include "egiz/topics.h"

namespace egiz {

namespace {

bool text_field(const Json& doc, const char* where, const char* key, std::string& out, std::string& error,
                size_t max_len) {
  const Json* v = doc.get(key);
  if (!v || !v->is(Json::Type::String) || v->text.empty() || v->text.size() > max_len) {
    error = std::string(where) + key + " must be a non-empty string of at most " + std::to_string(max_len) + " bytes";
    return false;
  }
  for (char c : v->text) {
    if (static_cast<unsigned char>(c) < 0x20) {
      error = std::string(where) + key + " must not contain control characters";
      return false;
    }
  }
  out = v->text;
  return true;
}

bool valid_host(const std::string& h) {
  for (char c : h)
    if (c == ' ' || c == '/' || c == '@' || c == '?' || c == '#') return false;
  return true;
}

}  // namespace

bool parse_provisioning(const std::string& json, Provisioning& out, std::string& error) {
  Json doc;
  if (!parse_json(json, doc, error, 8, kMaxProvisioningBytes)) return false;
  if (!doc.is(Json::Type::Object)) return (error = "expected a JSON object"), false;
  const Json* broker = doc.get("broker");
  if (!broker || !broker->is(Json::Type::Object)) return (error = "broker must be an object {host, port}"), false;
  Provisioning p;
  if (!text_field(doc, "", "site", p.site, error, 64) || !text_field(doc, "", "gateway", p.gateway, error, 64) ||
      !text_field(*broker, "broker.", "host", p.host, error, 253) ||
      !text_field(doc, "", "username", p.username, error, 128) ||
      !text_field(doc, "", "password", p.password, error, 128) ||
      !text_field(doc, "", "topic_prefix", p.topic_prefix, error, 200))
    return false;
  const Json* port = broker->get("port");
  if (!port || !port->is(Json::Type::Number) || port->number < 1 || port->number > 65535 ||
      port->number != std::floor(port->number))
    return (error = "broker.port must be an integer 1..65535"), false;
  p.port = static_cast<uint16_t>(port->number);
  if (!valid_level(p.site)) return (error = "site must be 1-64 characters of A-Z a-z 0-9 _ - ."), false;
  if (!valid_host(p.host)) return (error = "broker.host must be a host name or an address"), false;
  if (!valid_topic_prefix(p.topic_prefix))
    return (error = "topic_prefix must be a topic without wildcards or empty levels"), false;
  out = p;
  error.clear();
  return true;
}

std::string encode_provisioning(const Provisioning& p) {
  return "{\"site\":" + quote(p.site) + ",\"gateway\":" + quote(p.gateway) + ",\"broker\":{\"host\":" + quote(p.host) +
         ",\"port\":" + std::to_string(p.port) + "},\"username\":" + quote(p.username) +
         ",\"password\":" + quote(p.password) + ",\"topic_prefix\":" + quote(p.topic_prefix) + "}";
}

ProvisionVerdict provision_verdict(const Provisioning* stored, const Provisioning& offered, bool credentials_refused) {
  if (!stored) return ProvisionVerdict::Accept;
  if (*stored == offered) return ProvisionVerdict::Unchanged;
  return credentials_refused ? ProvisionVerdict::Accept : ProvisionVerdict::Refuse;
}

bool choose_broker(const std::vector<Announced>& found, const Provisioning& p, std::string& host, uint16_t& port) {
  for (int pass = 0; pass < 2; ++pass) {
    for (const auto& a : found) {
      if (a.site != p.site || a.gateway != p.gateway || a.host.empty()) continue;
      if (pass == 0 && a.is_broker && a.port) {
        host = a.host;
        port = a.port;
        return true;
      }
      if (pass == 1 && !a.is_broker) {
        host = a.host;
        port = p.port;
        return true;
      }
    }
  }
  return false;
}

std::string broker_uri(const std::string& host, uint16_t port) {
  bool v6 = host.find(':') != std::string::npos;
  return "mqtt://" + (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

}  // namespace egiz
