// Payloads: the exact bytes of every contract shape, the gateway's validation rules, what a failed
// sensor leaves out, and that encoded properties read back to the same values and points.
#include <cmath>

#include "check.h"
#include "egiz/json.h"
#include "egiz/payload.h"

using namespace egiz;

static Properties thermal() {
  return {{"temperature_zones", Value::of_numbers({187.25, 190.5, 192.75})}, {"setpoint", Value::of(190)}};
}
static Properties electrical() {
  return {{"voltage", Value::of_named({{"a", 229.9}, {"b", 230.4}, {"c", 231.0}})},
          {"current", Value::of_named({{"a", 14.21}, {"b", 14.05}, {"c", 14.33}})},
          {"power_factor", Value::of(0.93)},
          {"power_kw", Value::of(9.172)}};
}

TEST_SUITE(payload_shapes) {
  Sample s{1795440000.125, 42, thermal()};
  CHECK_EQ(encode_sample(s, "b7f3"),
           "{\"ts\":1795440000.125,\"seq\":42,\"boot\":\"b7f3\",\"properties\":"
           "{\"temperature_zones\":[187.25,190.5,192.75],\"setpoint\":190}}");
  std::vector<Sample> batch{{1795440000.0, 7, {{"rms", Value::of(1.25)}}}, {1795440000.5, 8, {{"rms", Value::of(1.5)}}}};
  CHECK_EQ(encode_batch(batch, "b"),
           "{\"boot\":\"b\",\"samples\":[{\"ts\":1795440000,\"seq\":7,\"properties\":{\"rms\":1.25}},"
           "{\"ts\":1795440000.5,\"seq\":8,\"properties\":{\"rms\":1.5}}]}");
  CHECK_EQ(encode_status(true, "1.2.0", 1795440000.0), "{\"state\":\"online\",\"fw\":\"1.2.0\",\"ts\":1795440000}");
  CHECK_EQ(encode_status(false, "1.2.0", -1), "{\"state\":\"offline\",\"fw\":\"1.2.0\"}");
  Ack ok;
  ok.cmd_id = "c1";
  ok.properties = {{"setpoint", Value::of(200)}};
  CHECK_EQ(encode_ack(ok), "{\"cmdId\":\"c1\",\"status\":\"ok\",\"properties\":{\"setpoint\":200}}");
  Ack no;
  no.cmd_id = "c2";
  no.status = "rejected";
  no.detail = "thermal.fan cannot be set on a oven node";
  CHECK_EQ(encode_ack(no), "{\"cmdId\":\"c2\",\"status\":\"rejected\",\"detail\":\"thermal.fan cannot be set on a oven node\"}");
  Properties mixed{{"door_open", Value::of_flag(true)}, {"mode", Value::of_text("bake")}, {"count", Value::of(-3)}};
  CHECK_EQ(encode_properties(mixed), "{\"door_open\":true,\"mode\":\"bake\",\"count\":-3}");
  // A batch of encoded samples is byte for byte the batch of the same samples.
  std::vector<EncodedSample> enc{{1795440000.0, 7, "{\"rms\":1.25}"}, {1795440000.5, 8, "{\"rms\":1.5}"}};
  CHECK_EQ(encode_batch(enc, "b"), encode_batch(batch, "b"));
  // The overhead constant really bounds what a batch adds per sample.
  EncodedSample big{1795440000.123, 18446744073709551615u, "{}"};
  CHECK(encode_batch({big, big}, "b").size() - encode_batch({big}, "b").size() <= kSampleOverheadBytes + 2);
}

TEST_SUITE(payload_rules) {
  std::string err;
  CHECK(check_properties(thermal(), err));
  CHECK(check_properties(electrical(), err));
  CHECK(valid_name("power_kw") && valid_name("_x") && valid_name("A9") && valid_name(std::string(64, 'a')));
  CHECK(!valid_name("") && !valid_name("9a") && !valid_name("a-b") && !valid_name("a.b") &&
        !valid_name(std::string(65, 'a')) && !valid_name("\xc3\xa9"));
  struct Bad {
    Properties props;
    const char* why;
  };
  std::vector<Bad> bad = {
      {{}, "empty"},
      {{{"9x", Value::of(1)}}, "bad name"},
      {{{"t", Value::of(NAN)}}, "NaN"},
      {{{"t", Value::of(INFINITY)}}, "inf"},
      {{{"t", Value::of_text(std::string(257, 'x'))}}, "long string"},
      {{{"z", Value::of_numbers({})}}, "empty array"},
      {{{"z", Value::of_numbers(std::vector<double>(65, 1.0))}}, "long array"},
      {{{"z", Value::of_numbers({1.0, NAN})}}, "NaN in array"},
      {{{"v", Value::of_named({})}}, "empty named"},
      {{{"v", Value::of_named({{"a-b", 1.0}})}}, "bad inner name"},
      {{{"v", Value::of_named({{"a", 1.0}, {"a", 2.0}})}}, "repeated inner name"},
      {{{"t", Value::of(1)}, {"t", Value::of(2)}}, "repeated name"},
  };
  for (const auto& b : bad) {
    err.clear();
    bool ok = check_properties(b.props, err);
    CHECK(!ok);
    if (ok) std::fprintf(stderr, "  accepted: %s\n", b.why);
    CHECK(!err.empty());
  }
  // 256 characters are fine even when they take more bytes.
  std::string s;
  for (int i = 0; i < 256; ++i) s += "\xc5\x9f";
  CHECK(check_properties({{"t", Value::of_text(s)}}, err));
  Properties many;
  for (int i = 0; i < 257; ++i) many.emplace_back("p" + std::to_string(i), Value::of(i));
  CHECK(!check_properties(many, err));
  many.pop_back();
  CHECK(check_properties(many, err));
}

TEST_SUITE(payload_failed_sensors) {
  size_t dropped = 0;
  Properties p{{"voltage", Value::of_named({{"a", 229.9}, {"b", NAN}, {"c", 231.0}})},
               {"temperature_zones", Value::of_numbers({180.0, NAN, 190.0})},
               {"power_kw", Value::of(NAN)},
               {"setpoint", Value::of(190)},
               {"mode", Value::of_text("bake")}};
  Properties kept = without_failed_values(p, &dropped);
  CHECK_EQ(dropped, size_t(3));
  CHECK_EQ(encode_properties(kept), "{\"voltage\":{\"a\":229.9,\"c\":231},\"setpoint\":190,\"mode\":\"bake\"}");
  std::string err;
  CHECK(check_properties(kept, err));
  Properties all_failed{{"current", Value::of_named({{"a", NAN}})}, {"t", Value::of(NAN)}};
  CHECK(without_failed_values(all_failed, &dropped).empty());
  CHECK_EQ(dropped, size_t(2));
  CHECK_EQ(encode_properties(without_failed_values(thermal())), encode_properties(thermal()));
}

TEST_SUITE(payload_flatten) {
  auto points = flatten(electrical());
  CHECK_EQ(points.size(), size_t(8));
  CHECK_EQ(points[0].path, "voltage.a");
  CHECK_EQ(points[5].path, "current.c");
  CHECK_EQ(points[6].path, "power_factor");
  auto zones = flatten(thermal());
  CHECK_EQ(zones.size(), size_t(4));
  CHECK_EQ(zones[2].path, "temperature_zones[2]");
  CHECK(zones[2].value.number == 192.75);
}

TEST_SUITE(payload_round_trip) {
  // Random valid properties: the encoded text parses back to exactly the same values.
  egiz_test::Rng rng(2024);
  Json j;
  std::string err;
  for (int i = 0; i < 2000; ++i) {
    Properties props;
    size_t n = 1 + rng.below(6);
    for (size_t k = 0; k < n; ++k) {
      std::string name = "p" + std::to_string(k);
      double x = (rng.uniform() - 0.5) * std::pow(10.0, static_cast<int>(rng.below(12)) - 4);
      switch (rng.below(5)) {
        case 0: props.emplace_back(name, Value::of(x)); break;
        case 1: props.emplace_back(name, Value::of_text(std::string(rng.below(5), 'q') + "\"\\\n\xc5\x9f")); break;
        case 2: props.emplace_back(name, Value::of_flag(rng.below(2) == 1)); break;
        case 3: props.emplace_back(name, Value::of_numbers({x, x / 3, -x})); break;
        default: props.emplace_back(name, Value::of_named({{"a", x}, {"b", x * 7}})); break;
      }
    }
    CHECK(check_properties(props, err));
    Sample s{1795440000.0 + rng.uniform(), rng.next() >> 1, props};
    std::string text = encode_sample(s, "boot");
    CHECK(parse_json(text, j, err));
    CHECK(j.get("ts")->number == s.ts);
    const Json* got = j.get("properties");
    CHECK(got && got->members.size() == props.size());
    if (!got || got->members.size() != props.size()) continue;
    for (size_t k = 0; k < props.size(); ++k) {
      const Value& v = props[k].second;
      const Json& g = got->members[k].second;
      CHECK_EQ(got->members[k].first, props[k].first);
      switch (v.kind) {
        case Value::Kind::Number: CHECK(g.number == v.number); break;
        case Value::Kind::Text: CHECK_EQ(g.text, v.text); break;
        case Value::Kind::Flag: CHECK(g.boolean == v.flag); break;
        case Value::Kind::Numbers:
          for (size_t q = 0; q < v.numbers.size(); ++q) CHECK(g.items[q].number == v.numbers[q]);
          break;
        case Value::Kind::Named:
          for (size_t q = 0; q < v.named.size(); ++q) CHECK(g.get(v.named[q].first)->number == v.named[q].second);
          break;
      }
    }
  }
}
