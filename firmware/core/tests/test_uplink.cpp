// The uplink: after an outage the ring drains as batches, one message in flight, seq rising in the
// order messages leave; an unconfirmed message is sent again byte for byte (same seq), so the gateway
// can drop the copy; nothing is skipped.
#include <map>

#include "check.h"
#include "egiz/json.h"
#include "egiz/uplink.h"

using namespace egiz;

static const std::string kPrefix = "openegiz/izmir-bakery/oven/oven-001";

TEST_SUITE(uplink_drain) {
  ReadingRing ring(64 * 1024);
  Uplink up("e5a1c3d2", UplinkLimits{10, 8192, 15000});
  uint32_t now = 1000;
  CHECK(up.next(ring, now) == nullptr);  // nothing yet
  const char* features[] = {"electrical", "thermal", "vibration"};
  // An outage: 3 features sampled 25 times, interleaved as the sensors produce them.
  for (int i = 0; i < 75; ++i)
    ring.push(features[i % 3], 1795440000000 + i * 100, "{\"x\":" + std::to_string(i) + "}");
  CHECK(up.next(ring, now) == nullptr);  // no prefix yet (not provisioned): readings wait
  up.set_topic_prefix(kPrefix);
  std::map<std::string, std::vector<int>> delivered;
  uint64_t expect_seq = 1;
  int msg_id = 100, messages = 0;
  Json j;
  std::string err;
  while (const Outgoing* m = up.next(ring, now)) {
    ++messages;
    CHECK(m->payload.size() <= 8192);
    CHECK_EQ(m->first_seq, expect_seq);
    CHECK_EQ(m->last_seq, expect_seq + m->samples - 1);
    expect_seq = m->last_seq + 1;
    CHECK(parse_json(m->payload, j, err));
    std::string feature = m->topic.substr(kPrefix.size() + 1, m->topic.size() - kPrefix.size() - 1 - 10);
    CHECK_EQ(m->topic, kPrefix + "/" + feature + "/telemetry");
    const Json* samples = j.get("samples");
    CHECK(samples != nullptr);  // 25 of each feature: always the batch form here
    if (!samples) break;
    CHECK_EQ(j.get("boot")->text, "e5a1c3d2");
    CHECK_EQ(samples->items.size(), m->samples);
    uint64_t seq = m->first_seq;
    for (const auto& s : samples->items) {
      CHECK_EQ(static_cast<uint64_t>(s.get("seq")->number), seq++);
      delivered[feature].push_back(static_cast<int>(s.get("properties")->get("x")->number));
    }
    std::string payload = m->payload;
    const Outgoing* again = up.next(ring, now + 10);  // not handed to the client yet: offered again
    CHECK(again != nullptr && again->payload == payload);
    up.published(++msg_id, now);
    CHECK(up.next(ring, now + 10) == nullptr);  // one in flight: nothing more until it is confirmed
    CHECK(!up.confirmed(msg_id + 1000));  // not ours
    CHECK(up.confirmed(msg_id));
    CHECK(!up.confirmed(msg_id));  // already done
    now += 5;
  }
  CHECK_EQ(messages, 9);  // 25 per feature in batches of 10: 10 + 10 + 5, three features
  for (int f = 0; f < 3; ++f) {
    const auto& got = delivered[features[f]];
    CHECK_EQ(got.size(), size_t(25));
    for (size_t i = 0; i < got.size(); ++i) CHECK_EQ(got[i], static_cast<int>(f + 3 * i));  // in order
  }
  CHECK_EQ(up.confirmed_samples(), uint64_t(75));
  CHECK_EQ(up.last_seq(), uint64_t(75));
  CHECK(ring.empty());
  CHECK_EQ(up.resent(), 0u);
}

TEST_SUITE(uplink_single) {
  ReadingRing ring(4096);
  Uplink up("b1");
  up.set_topic_prefix(kPrefix);
  ring.push("thermal", 1795440000125, "{\"setpoint\":190}");
  const Outgoing* m = up.next(ring, 0);
  CHECK(m != nullptr);
  if (!m) return;
  CHECK_EQ(m->topic, kPrefix + "/thermal/telemetry");
  CHECK_EQ(m->payload, "{\"ts\":1795440000.125,\"seq\":1,\"boot\":\"b1\",\"properties\":{\"setpoint\":190}}");
}

TEST_SUITE(uplink_resend) {
  ReadingRing ring(4096);
  Uplink up("b", UplinkLimits{5, 4096, 1000});
  up.set_topic_prefix(kPrefix);
  for (int i = 0; i < 3; ++i) ring.push("thermal", 1795440000000 + i, "{\"i\":" + std::to_string(i) + "}");
  const Outgoing* m = up.next(ring, 0);
  CHECK(m != nullptr);
  if (!m) return;
  std::string first = m->payload;
  up.published(1, 0);
  ring.push("thermal", 1795440000010, "{\"i\":3}");  // arrives while the batch is in flight
  // The connection drops before the PUBACK: the same bytes go out again after the reconnect.
  up.connection_lost();
  m = up.next(ring, 50);
  CHECK(m != nullptr && m->payload == first);
  up.published(2, 50);
  // No PUBACK within the timeout: sent again, still the same bytes.
  CHECK(up.next(ring, 500) == nullptr);
  m = up.next(ring, 1050);
  CHECK(m != nullptr && m->payload == first);
  up.published(3, 1050);
  CHECK_EQ(up.resent(), 2u);
  // The client failed to take it: offered again at once.
  up.publish_failed();
  CHECK(up.next(ring, 1060) != nullptr);
  up.published(4, 1060);
  // A late PUBACK of the very first copy completes the message.
  CHECK(up.confirmed(1));
  m = up.next(ring, 1070);
  CHECK(m != nullptr);
  if (!m) return;
  CHECK_EQ(m->first_seq, uint64_t(4));  // the reading that came in meanwhile, next seq
  CHECK_EQ(m->payload, "{\"ts\":1795440000.01,\"seq\":4,\"boot\":\"b\",\"properties\":{\"i\":3}}");
  // Re-provisioned to another prefix while in flight: the message follows.
  up.set_topic_prefix("openegiz/other/oven/oven-001");
  m = up.next(ring, 1080);
  CHECK(m != nullptr && m->topic == "openegiz/other/oven/oven-001/thermal/telemetry");
}

TEST_SUITE(uplink_size_limit) {
  ReadingRing ring(64 * 1024);
  Uplink up("boot-with-a-long-id-0000000000000000", UplinkLimits{1000, 1024, 1000});
  up.set_topic_prefix(kPrefix);
  std::string props = "{\"voltage\":{\"a\":229.87,\"b\":230.4,\"c\":231.02},\"current\":{\"a\":14.21,\"b\":14.05,"
                      "\"c\":14.33},\"power_factor\":0.93,\"power_kw\":9.172}";
  for (int i = 0; i < 100; ++i) ring.push("electrical", 1795440000000 + i * 1000 + 999, props);
  size_t total = 0;
  int id = 0;
  while (const Outgoing* m = up.next(ring, 0)) {
    CHECK(m->payload.size() <= 1024);
    CHECK(m->samples >= 1);
    total += m->samples;
    up.published(++id, 0);
    up.confirmed(id);
  }
  CHECK_EQ(total, size_t(100));
  CHECK(id > 10);
}
