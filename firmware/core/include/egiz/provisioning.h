// The provisioning document the gateway POSTs to a node on approval (docs/discovery.md):
//   {"site":"izmir-bakery","gateway":"gw-izmir-line-a","broker":{"host":"10.0.5.1","port":1883},
//    "username":"node-oven-001","password":"...","topic_prefix":"openegiz/izmir-bakery/oven/oven-001"}
// whether a node takes it, and which broker a node found over mDNS belongs to its gateway.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace egiz {

struct Provisioning {
  std::string site, gateway, host, username, password, topic_prefix;
  uint16_t port = 0;

  bool operator==(const Provisioning& o) const {
    return site == o.site && gateway == o.gateway && host == o.host && port == o.port && username == o.username &&
           password == o.password && topic_prefix == o.topic_prefix;
  }
  bool operator!=(const Provisioning& o) const { return !(*this == o); }
};

constexpr size_t kMaxProvisioningBytes = 2048;

// Every field is required and checked (site a topic level, port 1..65535, a prefix without
// wildcards, ...). Keys the node does not know are ignored, so a newer gateway can add some.
// On error `out` is left unchanged.
bool parse_provisioning(const std::string& json, Provisioning& out, std::string& error);
std::string encode_provisioning(const Provisioning& p);  // what the node keeps in NVS

// Whether a node takes an offered document:
//  - Accept: it had none, or the broker refused the credentials it has (the gateway approved the node
//    again and handed out new ones, e.g. after its data was lost);
//  - Unchanged: the same document again (the gateway retrying a delivery whose answer it missed);
//  - Refuse: it is provisioned and its credentials work, so nobody on the line network can take the
//    node over; hold BOOT at power-up to forget them.
enum class ProvisionVerdict { Accept, Unchanged, Refuse };
ProvisionVerdict provision_verdict(const Provisioning* stored, const Provisioning& offered, bool credentials_refused);

// A broker announced over mDNS: `_mqtt._tcp` (the broker itself) or `_egiz-gw._tcp` (the gateway's
// HTTP API; its host, with the provisioned broker port). TXT `site` and `gateway` say whose it is.
struct Announced {
  std::string host;
  uint16_t port = 0;
  std::string site, gateway;
  bool is_broker = true;  // false: an _egiz-gw._tcp announcement
};

// The broker of the node's own gateway among `found`: an `_mqtt._tcp` of the same gateway id first,
// then the host of the same gateway's `_egiz-gw._tcp` with the provisioned port. Others (another line,
// another site) never match. False when none does.
bool choose_broker(const std::vector<Announced>& found, const Provisioning& p, std::string& host, uint16_t& port);

// "mqtt://host:port", with brackets around an IPv6 address.
std::string broker_uri(const std::string& host, uint16_t port);

}  // namespace egiz
