// The outage ring: oldest dropped and counted when full, batches of one feature taken oldest first,
// other features keep their order; checked against a plain model over many random operations.
#include <deque>

#include "check.h"
#include "egiz/ring.h"

using namespace egiz;

static std::string props(int i) { return "{\"v\":" + std::to_string(i) + "}"; }

TEST_SUITE(ring_basics) {
  ReadingRing r(1000);
  CHECK(r.empty());
  CHECK(r.push("thermal", 1, props(1)));
  CHECK(r.push("electrical", 2, props(2)));
  CHECK(r.push("thermal", 3, props(3)));
  CHECK(r.push("thermal", 4, props(4)));
  CHECK(r.push("vibration", 5, props(5)));
  CHECK_EQ(r.size(), size_t(5));
  auto b = r.take_batch(10, 10000, 0);  // the oldest's feature, then its later readings
  CHECK_EQ(b.size(), size_t(3));
  CHECK_EQ(b[0].feature, "thermal");
  CHECK_EQ(b[0].ts_ms, int64_t(1));
  CHECK_EQ(b[1].ts_ms, int64_t(3));
  CHECK_EQ(b[2].properties, props(4));
  CHECK_EQ(r.size(), size_t(2));
  b = r.take_batch(10, 10000, 0);
  CHECK(b.size() == 1 && b[0].feature == "electrical" && b[0].ts_ms == 2);
  b = r.take_batch(10, 10000, 0);
  CHECK(b.size() == 1 && b[0].feature == "vibration");
  CHECK(r.empty() && r.used_bytes() == 0);
  CHECK(r.take_batch(10, 10000, 0).empty());
  // Limits: sample count, bytes (the first is always taken), refusals.
  for (int i = 0; i < 6; ++i) r.push("t", i, props(i));
  CHECK_EQ(r.take_batch(4, 10000, 0).size(), size_t(4));
  CHECK_EQ(r.take_batch(4, 1, 0).size(), size_t(1));  // over budget: one anyway
  CHECK_EQ(r.take_batch(4, 2 * (props(5).size() + 10), 10).size(), size_t(1));
  CHECK(r.empty());
  CHECK(!r.push("", 1, "{}"));
  CHECK(!r.push(std::string(65, 'f'), 1, "{}"));
  CHECK(!r.push("t", 1, std::string(ReadingRing::kMaxProperties + 1, 'x')));
  ReadingRing tiny(40);
  CHECK(!tiny.push("t", 1, std::string(40, 'x')));  // larger than the whole ring
  CHECK_EQ(tiny.dropped(), 0u);
  // Negative and large times survive the byte encoding.
  r.push("t", -5, "{}");
  r.push("t", 4102444800123, "{}");
  b = r.take_batch(5, 1000, 0);
  CHECK(b.size() == 2 && b[0].ts_ms == -5 && b[1].ts_ms == 4102444800123);
}

TEST_SUITE(ring_full) {
  // Each record: 11 bytes of header + 1 (feature) + properties.
  ReadingRing r(10 * (11 + 1 + 7));  // exactly ten records of {"v":N} with N one digit
  for (int i = 0; i < 10; ++i) CHECK(r.push("t", i, props(i)));
  CHECK_EQ(r.used_bytes(), r.capacity_bytes());
  CHECK_EQ(r.dropped(), 0u);
  CHECK(r.push("t", 10, props(7)));  // same size: exactly one dropped
  CHECK_EQ(r.dropped(), 1u);
  CHECK_EQ(r.size(), size_t(10));
  auto b = r.take_batch(100, 100000, 0);
  CHECK_EQ(b.size(), size_t(10));
  CHECK_EQ(b.front().ts_ms, int64_t(1));  // 0 was the oldest and went first
  CHECK_EQ(b.back().ts_ms, int64_t(10));
  CHECK(r.push("t", 11, std::string(100, 'x')));  // a big one after wrapping
  CHECK(r.take_batch(1, 1000, 0)[0].properties == std::string(100, 'x'));
}

TEST_SUITE(ring_model) {
  // Random pushes and batches against a deque model: same readings, same order, same drops.
  struct M {
    std::string feature;
    int64_t ts;
    std::string props;
    size_t size() const { return 11 + feature.size() + props.size(); }
  };
  const char* features[] = {"electrical", "thermal", "vibration"};
  egiz_test::Rng rng(31337);
  for (size_t capacity : {64u, 300u, 997u, 4096u}) {
    ReadingRing r(capacity);
    std::deque<M> model;
    size_t used = 0;
    uint32_t dropped = 0;
    int64_t ts = 0;
    for (int step = 0; step < 4000; ++step) {
      if (rng.below(3) != 0) {
        M m{features[rng.below(3)], ++ts, std::string(1 + rng.below(60), static_cast<char>('a' + rng.below(26)))};
        bool fits = m.size() <= capacity;
        CHECK_EQ(r.push(m.feature, m.ts, m.props), fits);
        if (!fits) continue;
        while (capacity - used < m.size()) {
          used -= model.front().size();
          model.pop_front();
          ++dropped;
        }
        model.push_back(m);
        used += m.size();
      } else {
        size_t max_samples = 1 + rng.below(6), max_bytes = rng.below(200), overhead = rng.below(20);
        auto got = r.take_batch(max_samples, max_bytes, overhead);
        std::vector<M> want;
        size_t bytes = 0;
        for (auto it = model.begin(); it != model.end();) {
          bool take = want.empty() ? true
                                   : it->feature == want.front().feature && want.size() < max_samples &&
                                         bytes < max_bytes && bytes + it->props.size() + overhead <= max_bytes;
          if (take) {
            want.push_back(*it);
            bytes += it->props.size() + overhead;
            used -= it->size();
            it = model.erase(it);
          } else {
            ++it;
          }
        }
        CHECK_EQ(got.size(), want.size());
        for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
          CHECK_EQ(got[i].feature, want[i].feature);
          CHECK_EQ(got[i].ts_ms, want[i].ts);
          CHECK_EQ(got[i].properties, want[i].props);
        }
      }
      CHECK_EQ(r.size(), model.size());
      CHECK_EQ(r.used_bytes(), used);
      CHECK_EQ(r.dropped(), dropped);
    }
    // What is left drains completely, each batch in time order.
    size_t left = r.size(), drained = 0;
    while (!r.empty()) {
      auto b = r.take_batch(3, 1000, 0);
      CHECK(!b.empty());
      if (b.empty()) break;
      for (size_t i = 1; i < b.size(); ++i) CHECK(b[i].ts_ms > b[i - 1].ts_ms);
      drained += b.size();
    }
    CHECK_EQ(drained, left);
  }
}
