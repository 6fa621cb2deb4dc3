// Getting connected: reconnect backoff, topics, the provisioning document and who may replace it,
// and finding the own gateway's broker among mDNS announcements.
#include <algorithm>

#include "check.h"
#include "egiz/backoff.h"
#include "egiz/provisioning.h"
#include "egiz/topics.h"

using namespace egiz;

TEST_SUITE(backoff) {
  Backoff b(500, 10000, 42), same(500, 10000, 42);
  for (int i = 0; i < 40; ++i) {
    uint32_t step = i < 5 ? (500u << i) : 10000u;
    uint32_t d = b.next_ms();
    CHECK(d >= step / 2 && d <= step);  // equal jitter within the exponential step, capped
    CHECK_EQ(d, same.next_ms());        // deterministic for a seed
  }
  CHECK_EQ(b.attempts(), 40u);
  b.reset();
  uint32_t first = b.next_ms();
  CHECK(first >= 250 && first <= 500);
  // Two nodes with different seeds do not retry in step.
  Backoff x(500, 10000, 42), y(500, 10000, 43);
  int differ = 0;
  for (int i = 0; i < 10; ++i) differ += x.next_ms() != y.next_ms();
  CHECK(differ >= 8);
  // The jitter covers its range rather than a few values.
  Backoff wide(1000, 1000, 7);
  uint32_t lo = 1000, hi = 0;
  for (int i = 0; i < 2000; ++i) {
    uint32_t d = wide.next_ms();
    lo = std::min(lo, d);
    hi = std::max(hi, d);
  }
  CHECK(lo < 520 && hi > 980);
  // Degenerate arguments stay sane; huge attempt counts do not overflow.
  Backoff odd(0, 0, 0);
  for (int i = 0; i < 100; ++i) CHECK(odd.next_ms() <= 1);
  Backoff big(1, 4294967295u, 5);
  for (int i = 0; i < 100; ++i) CHECK(big.next_ms() <= 4294967295u);
}

TEST_SUITE(topics) {
  std::string p = topic_prefix("izmir-bakery", "oven", "oven-001");
  CHECK_EQ(p, "openegiz/izmir-bakery/oven/oven-001");
  CHECK_EQ(telemetry_topic(p, "thermal"), "openegiz/izmir-bakery/oven/oven-001/thermal/telemetry");
  CHECK_EQ(status_topic(p), "openegiz/izmir-bakery/oven/oven-001/status");
  CHECK_EQ(command_topic(p), "openegiz/izmir-bakery/oven/oven-001/cmd");
  CHECK_EQ(ack_topic(p), "openegiz/izmir-bakery/oven/oven-001/cmd/ack");
  CHECK(valid_level("oven-001") && valid_level("izmir.bakery_2") && valid_level(std::string(64, 'a')));
  CHECK(!valid_level("") && !valid_level("a/b") && !valid_level("+") && !valid_level("#") &&
        !valid_level(std::string(65, 'a')) && !valid_level("a b") && !valid_level("\xc3\xa9"));
  CHECK(valid_topic_prefix(p) && valid_topic_prefix("sensors/site/x"));
  CHECK(!valid_topic_prefix("") && !valid_topic_prefix("/a") && !valid_topic_prefix("a/") &&
        !valid_topic_prefix("a//b") && !valid_topic_prefix("openegiz/s/+/oven-001") &&
        !valid_topic_prefix("a/#") && !valid_topic_prefix(std::string("a\0b", 3)) &&
        !valid_topic_prefix(std::string(201, 'a')));
}

static const char* kDoc =
    "{\"site\":\"izmir-bakery\",\"gateway\":\"gw-izmir-line-a\",\"broker\":{\"host\":\"10.0.5.1\",\"port\":1883},"
    "\"username\":\"node-oven-001\",\"password\":\"Zq3-7d_Jk2pLm9xWv4Rt8yHb6NcE1sAo\","
    "\"topic_prefix\":\"openegiz/izmir-bakery/oven/oven-001\"}";

TEST_SUITE(provisioning) {
  Provisioning p;
  std::string err;
  CHECK(parse_provisioning(kDoc, p, err));
  CHECK(err.empty());
  CHECK_EQ(p.site, "izmir-bakery");
  CHECK_EQ(p.gateway, "gw-izmir-line-a");
  CHECK_EQ(p.host, "10.0.5.1");
  CHECK_EQ(p.port, 1883);
  CHECK_EQ(p.username, "node-oven-001");
  CHECK_EQ(p.password, "Zq3-7d_Jk2pLm9xWv4Rt8yHb6NcE1sAo");
  CHECK_EQ(p.topic_prefix, "openegiz/izmir-bakery/oven/oven-001");
  // What the node stores reads back the same.
  Provisioning again;
  CHECK(parse_provisioning(encode_provisioning(p), again, err));
  CHECK(again == p);
  // Unknown keys are ignored (a newer gateway may send more); key order does not matter.
  CHECK(parse_provisioning(
      "{\"topic_prefix\":\"openegiz/s/oven/o\",\"tls\":false,\"password\":\"p\",\"username\":\"u\","
      "\"broker\":{\"port\":8883,\"host\":\"fe80::1\",\"x\":1},\"gateway\":\"g\",\"site\":\"s\"}",
      again, err));
  CHECK(again.port == 8883 && again.host == "fe80::1");
  auto doc = [](const std::string& site, const std::string& broker, const std::string& user,
                const std::string& prefix) {
    return "{\"site\":" + site + ",\"gateway\":\"g\",\"broker\":" + broker + ",\"username\":" + user +
           ",\"password\":\"p\",\"topic_prefix\":" + prefix + "}";
  };
  const std::string ok_broker = "{\"host\":\"h\",\"port\":1883}", ok_prefix = "\"openegiz/s/oven/o\"";
  std::vector<std::string> bad = {
      "", "{}", "[]", "not json", "null",
      doc("\"s\"", "{\"host\":\"h\",\"port\":70000}", "\"u\"", ok_prefix),
      doc("\"s\"", "{\"host\":\"h\",\"port\":0}", "\"u\"", ok_prefix),
      doc("\"s\"", "{\"host\":\"h\",\"port\":1.5}", "\"u\"", ok_prefix),
      doc("\"s\"", "{\"host\":\"h\",\"port\":\"1883\"}", "\"u\"", ok_prefix),
      doc("\"s\"", "{\"host\":\"h\"}", "\"u\"", ok_prefix),
      doc("\"s\"", "{\"host\":\"\",\"port\":1883}", "\"u\"", ok_prefix),
      doc("\"s\"", "{\"host\":\"a b\",\"port\":1883}", "\"u\"", ok_prefix),
      doc("\"s\"", "\"h:1883\"", "\"u\"", ok_prefix),
      doc("\"s/x\"", ok_broker, "\"u\"", ok_prefix),
      doc("\"\"", ok_broker, "\"u\"", ok_prefix),
      doc("1", ok_broker, "\"u\"", ok_prefix),
      doc("\"s\"", ok_broker, "\"\"", ok_prefix),
      doc("\"s\"", ok_broker, "null", ok_prefix),
      doc("\"s\"", ok_broker, "\"u\\n\"", ok_prefix),
      doc("\"s\"", ok_broker, "\"u\"", "\"openegiz/s/+/o\""),  // a wildcard: not a topic one can publish to
      doc("\"s\"", ok_broker, "\"u\"", "\"openegiz//o\""),
      doc("\"s\"", ok_broker, "\"u\"", "\"/openegiz/s\""),
      "{\"site\":\"s\",\"site\":\"t\",\"gateway\":\"g\",\"broker\":{\"host\":\"h\",\"port\":1},\"username\":\"u\","
      "\"password\":\"p\",\"topic_prefix\":\"a/b\"}",
      std::string(kDoc) + std::string(2048, ' '),  // too long
  };
  for (const auto& b : bad) {
    Provisioning q = p;
    err.clear();
    bool ok = parse_provisioning(b, q, err);
    CHECK(!ok);
    if (ok) std::fprintf(stderr, "  accepted: %s\n", b.c_str());
    CHECK(!err.empty());
    CHECK(q == p);  // untouched on error
  }
  // The happy document with each field removed in turn is refused.
  for (const char* key : {"\"site\"", "\"gateway\"", "\"broker\"", "\"username\"", "\"password\"", "\"topic_prefix\""}) {
    std::string d = kDoc;
    size_t at = d.find(key);
    d.replace(at, std::string(key).size(), "\"unused\"");
    CHECK(!parse_provisioning(d, again, err));
  }
}

TEST_SUITE(provision_verdict) {
  Provisioning stored, offered;
  std::string err;
  CHECK(parse_provisioning(kDoc, stored, err));
  offered = stored;
  CHECK(provision_verdict(nullptr, offered, false) == ProvisionVerdict::Accept);
  CHECK(provision_verdict(&stored, offered, false) == ProvisionVerdict::Unchanged);  // a retried delivery
  offered.password = "another";
  CHECK(provision_verdict(&stored, offered, false) == ProvisionVerdict::Refuse);  // working credentials stay
  CHECK(provision_verdict(&stored, offered, true) == ProvisionVerdict::Accept);   // the broker refused ours
}

TEST_SUITE(broker_choice) {
  Provisioning p;
  std::string err;
  CHECK(parse_provisioning(kDoc, p, err));
  std::string host;
  uint16_t port = 0;
  std::vector<Announced> found = {
      {"10.0.9.1", 1883, "izmir-bakery", "gw-izmir-line-b", true},  // the other line of the site
      {"10.0.7.7", 1883, "ankara-bakery", "gw-izmir-line-a", true}, // another site
      {"10.0.5.2", 8080, "izmir-bakery", "gw-izmir-line-a", false}, // our gateway's API
  };
  CHECK(choose_broker(found, p, host, port));
  CHECK(host == "10.0.5.2" && port == 1883);  // the gateway's host, the provisioned broker port
  found.push_back({"10.0.5.3", 1884, "izmir-bakery", "gw-izmir-line-a", true});
  CHECK(choose_broker(found, p, host, port));
  CHECK(host == "10.0.5.3" && port == 1884);  // the broker announcement wins
  found = {{"10.0.9.1", 1883, "izmir-bakery", "gw-izmir-line-b", true}};
  host = "unchanged";
  CHECK(!choose_broker(found, p, host, port));
  CHECK_EQ(host, "unchanged");
  CHECK(!choose_broker({}, p, host, port));
  CHECK_EQ(broker_uri("10.0.5.1", 1883), "mqtt://10.0.5.1:1883");
  CHECK_EQ(broker_uri("fe80::1", 1883), "mqtt://[fe80::1]:1883");
  CHECK_EQ(broker_uri("gw.local", 1884), "mqtt://gw.local:1884");
}
