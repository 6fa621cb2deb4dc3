// The node's own logic: commands and their acks, updates, sensor values to properties, the sampling
// schedule, and identity.
#include <cmath>

#include "check.h"
#include "egiz/commands.h"
#include "egiz/identity.h"
#include "egiz/readings.h"

using namespace egiz;

static Ack run(const std::string& json, const std::string& type, NodeSettings& s, CommandParse* parsed = nullptr) {
  Command c;
  std::string err;
  CommandParse r = parse_command(json, c, err);
  if (parsed) *parsed = r;
  if (r != CommandParse::Ok) {
    Ack a;
    a.cmd_id = c.cmd_id;
    a.status = "rejected";
    a.detail = err;
    return a;
  }
  return apply_command(c, *profile_for(type), s);
}

TEST_SUITE(commands) {
  const TypeProfile& oven = *profile_for("oven");
  NodeSettings s = NodeSettings::defaults(oven);
  CHECK_EQ(s.setpoint, 190.0);
  CHECK_EQ(s.interval_ms, 1000u);
  // Exactly what the gateway publishes (json.dumps: spaces after ':' and ',').
  Ack a = run("{\"cmdId\": \"6f1c2d0e9a8b4c7d8e5f4a3b2c1d0e9f\", \"feature\": \"thermal\", "
              "\"desiredProperties\": {\"setpoint\": 210.0}, \"ts\": 1718000000.25}",
              "oven", s);
  CHECK_EQ(encode_ack(a), "{\"cmdId\":\"6f1c2d0e9a8b4c7d8e5f4a3b2c1d0e9f\",\"status\":\"ok\",\"properties\":{\"setpoint\":210}}");
  CHECK_EQ(s.setpoint, 210.0);
  a = run("{\"cmdId\":\"c2\",\"feature\":\"sampling\",\"desiredProperties\":{\"rate_hz\":4}}", "oven", s);
  CHECK_EQ(encode_ack(a), "{\"cmdId\":\"c2\",\"status\":\"ok\",\"properties\":{\"rate_hz\":4}}");
  CHECK_EQ(s.interval_ms, 250u);
  a = run("{\"cmdId\":\"c3\",\"feature\":\"sampling\",\"desiredProperties\":{\"rate_hz\":3}}", "oven", s);
  CHECK_EQ(s.interval_ms, 333u);
  CHECK_EQ(encode_ack(a), "{\"cmdId\":\"c3\",\"status\":\"ok\",\"properties\":{\"rate_hz\":3.003003}}");  // in effect
  a = run("{\"cmdId\":\"c4\",\"feature\":\"sampling\",\"desiredProperties\":{\"interval_ms\":5000}}", "oven", s);
  CHECK(a.status == "ok" && s.interval_ms == 5000);
  // null clears a desired value: back to the default.
  a = run("{\"cmdId\":\"c5\",\"feature\":\"thermal\",\"desiredProperties\":{\"setpoint\":null}}", "oven", s);
  CHECK_EQ(encode_ack(a), "{\"cmdId\":\"c5\",\"status\":\"ok\",\"properties\":{\"setpoint\":190}}");
  a = run("{\"cmdId\":\"c6\",\"feature\":\"sampling\",\"desiredProperties\":{\"interval_ms\":null}}", "oven", s);
  CHECK(a.status == "ok" && s.interval_ms == 1000);
  // Anything wrong rejects the whole command and changes nothing.
  s.setpoint = 200;
  s.interval_ms = 2000;
  const char* rejected[] = {
      "{\"cmdId\":\"r1\",\"feature\":\"thermal\",\"desiredProperties\":{\"setpoint\":210,\"fan\":3}}",
      "{\"cmdId\":\"r2\",\"feature\":\"thermal\",\"desiredProperties\":{\"setpoint\":999}}",
      "{\"cmdId\":\"r3\",\"feature\":\"thermal\",\"desiredProperties\":{\"setpoint\":\"hot\"}}",
      "{\"cmdId\":\"r4\",\"feature\":\"thermal\",\"desiredProperties\":{\"setpoint\":true}}",
      "{\"cmdId\":\"r5\",\"feature\":\"thermal\",\"desiredProperties\":{\"setpoint\":[1]}}",
      "{\"cmdId\":\"r6\",\"feature\":\"thermal\",\"desiredProperties\":{}}",
      "{\"cmdId\":\"r7\",\"feature\":\"motor\",\"desiredProperties\":{\"speed_rpm\":100}}",  // not an oven's
      "{\"cmdId\":\"r8\",\"feature\":\"sampling\",\"desiredProperties\":{\"interval_ms\":50}}",
      "{\"cmdId\":\"r9\",\"feature\":\"sampling\",\"desiredProperties\":{\"rate_hz\":0}}",
      "{\"cmdId\":\"r10\",\"feature\":\"sampling\",\"desiredProperties\":{\"rate_hz\":2,\"interval_ms\":100}}",
      "{\"cmdId\":\"r11\",\"feature\":\"sampling\",\"desiredProperties\":{\"interval_ms\":100,\"setpoint\":200}}",
      "{\"cmdId\":\"r12\",\"desiredProperties\":{\"setpoint\":200}}",
      "{\"cmdId\":\"r13\",\"feature\":\"a.b\",\"desiredProperties\":{\"setpoint\":200}}",
      "{\"cmdId\":\"r14\",\"feature\":\"thermal\",\"desiredProperties\":[1]}",
  };
  for (const char* r : rejected) {
    CommandParse parsed;
    a = run(r, "oven", s, &parsed);
    CHECK_EQ(a.status, "rejected");
    CHECK(!a.detail.empty());
    CHECK(a.properties.empty());
    CHECK(!a.cmd_id.empty());  // every one of them can be answered
    if (a.status != "rejected") std::fprintf(stderr, "  accepted: %s\n", r);
  }
  CHECK(s.setpoint == 200 && s.interval_ms == 2000);
  // No cmdId: nothing to answer to.
  const char* unanswerable[] = {"{\"feature\":\"thermal\",\"desiredProperties\":{\"setpoint\":1}}",
                                "{\"cmdId\":\"\",\"feature\":\"thermal\"}", "{\"cmdId\":7}", "[]", "nope", ""};
  for (const char* u : unanswerable) {
    Command c;
    std::string err;
    CHECK(parse_command(u, c, err) == CommandParse::Unanswerable);
    CHECK(!err.empty());
  }
  // Other types have their own setpoints, with the simulator's names and ranges.
  NodeSettings m = NodeSettings::defaults(*profile_for("mixer"));
  CHECK_EQ(run("{\"cmdId\":\"m\",\"feature\":\"motor\",\"desiredProperties\":{\"speed_rpm\":150}}", "mixer", m).status,
           "ok");
  CHECK_EQ(m.setpoint, 150.0);
  NodeSettings c = NodeSettings::defaults(*profile_for("cooler"));
  CHECK_EQ(run("{\"cmdId\":\"k\",\"feature\":\"climate\",\"desiredProperties\":{\"setpoint\":-2.5}}", "cooler", c).status,
           "ok");
  CHECK_EQ(run("{\"cmdId\":\"k2\",\"feature\":\"climate\",\"desiredProperties\":{\"setpoint\":20}}", "cooler", c).status,
           "rejected");
  CHECK_EQ(c.setpoint, -2.5);
  // Stored settings out of range fall back to the defaults.
  NodeSettings stored;
  stored.interval_ms = 7;
  stored.setpoint = NAN;
  NodeSettings fixed = stored.sanitized(*profile_for("oven"));
  CHECK(fixed.interval_ms == 1000 && fixed.setpoint == 190.0);
  // A command delivered twice is applied once.
  RecentCommands recent;
  CHECK(!recent.seen_before("a"));
  CHECK(recent.seen_before("a"));
  for (int i = 0; i < 8; ++i) recent.seen_before("x" + std::to_string(i));
  CHECK(!recent.seen_before("a"));  // long forgotten
}

TEST_SUITE(commands_fuzz) {
  // Mutated commands: parsing never crashes, and nothing but "ok" changes the settings.
  const std::string seed = "{\"cmdId\":\"c\",\"feature\":\"thermal\",\"desiredProperties\":{\"setpoint\":210}}";
  egiz_test::Rng rng(4);
  const TypeProfile& oven = *profile_for("oven");
  for (int i = 0; i < 5000; ++i) {
    std::string s = seed;
    for (int e = 0; e < 3; ++e) s[rng.below(static_cast<uint32_t>(s.size()))] = "0123456789.-e\"{}:,nul "[rng.below(23)];
    NodeSettings st = NodeSettings::defaults(oven), before = st;
    Command c;
    std::string err;
    if (parse_command(s, c, err) != CommandParse::Ok) continue;
    Ack a = apply_command(c, oven, st);
    if (a.status != "ok") CHECK(st.setpoint == before.setpoint && st.interval_ms == before.interval_ms);
    else CHECK(st.setpoint >= 50 && st.setpoint <= 300);
  }
}

TEST_SUITE(ota) {
  Command c;
  std::string err;
  OtaRequest r;
  const std::string hash = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
  CHECK(parse_command("{\"cmdId\":\"o\",\"feature\":\"ota\",\"desiredProperties\":{\"url\":\"http://10.0.5.1:8080/fw/1.1.0.bin\","
                      "\"sha256\":\"" + hash + "\"}}",
                      c, err) == CommandParse::Ok);
  CHECK(is_ota(c));
  CHECK(parse_ota(c, r, err));
  CHECK_EQ(r.url, "http://10.0.5.1:8080/fw/1.1.0.bin");
  CHECK_EQ(r.sha256, "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
  const std::string bad[] = {
      "{\"url\":\"ftp://x/fw.bin\",\"sha256\":\"" + hash + "\"}",
      "{\"url\":\"http://x/f w.bin\",\"sha256\":\"" + hash + "\"}",
      "{\"url\":\"http://x/fw.bin\",\"sha256\":\"abc\"}",
      "{\"url\":\"http://x/fw.bin\",\"sha256\":\"" + hash.substr(0, 63) + "g\"}",
      "{\"url\":\"http://x/fw.bin\"}",
      "{\"sha256\":\"" + hash + "\"}",
      "{\"url\":\"http://x/fw.bin\",\"sha256\":\"" + hash + "\",\"force\":\"yes\"}",
      "{\"url\":null,\"sha256\":\"" + hash + "\"}",
      "{\"url\":1,\"sha256\":\"" + hash + "\"}",
  };
  for (const auto& d : bad) {
    CHECK(parse_command("{\"cmdId\":\"o\",\"feature\":\"ota\",\"desiredProperties\":" + d + "}", c, err) ==
          CommandParse::Ok);
    CHECK(!parse_ota(c, r, err));
    CHECK(!err.empty());
  }
  CHECK(parse_command("{\"cmdId\":\"t\",\"feature\":\"thermal\",\"desiredProperties\":{\"setpoint\":1}}", c, err) ==
        CommandParse::Ok);
  CHECK(!is_ota(c) && !parse_ota(c, r, err));
}

TEST_SUITE(readings) {
  // Float values from the meters become short decimals at the meters' resolution.
  std::vector<PhaseReading> phases = {{true, 229.9f, 14.21f, 3038.2f, 0.93f},
                                      {true, 230.4f, 14.05f, 3010.5f, 0.93f},
                                      {true, 231.0f, 14.33f, 3078.5f, 0.93f}};
  Properties e = electrical_properties(phases);
  CHECK_EQ(encode_properties(e),
           "{\"voltage\":{\"a\":229.9,\"b\":230.4,\"c\":231},\"current\":{\"a\":14.21,\"b\":14.05,\"c\":14.33},"
           "\"power_factor\":0.93,\"power_kw\":9.1272}");
  std::string err;
  CHECK(check_properties(e, err));
  // Phase b's meter does not answer: a and c keep their letters.
  phases[1].ok = false;
  e = electrical_properties(phases);
  CHECK_EQ(encode_properties(e),
           "{\"voltage\":{\"a\":229.9,\"c\":231},\"current\":{\"a\":14.21,\"c\":14.33},"
           "\"power_factor\":0.93,\"power_kw\":6.1167}");
  phases[0].amps = NAN;  // a garbled answer counts as none
  e = electrical_properties(phases);
  CHECK_EQ(flatten(e)[0].path, "voltage.c");
  // No load: the meters' own power factor.
  CHECK_EQ(encode_properties(electrical_properties({{true, 230, 0, 0, 0}})),
           "{\"voltage\":{\"a\":230},\"current\":{\"a\":0},\"power_factor\":0,\"power_kw\":0}");
  CHECK(electrical_properties({{false, 0, 0, 0, 0}, {false, 0, 0, 0, 0}}).empty());
  CHECK(electrical_properties({}).empty());
  // Zones: DS18B20 steps of 1/16 degree print exactly; one failed probe drops the array.
  size_t failed = 0;
  Properties t = thermal_properties({21.0625, 22.5, -3.125}, true, 4.0, &failed);
  CHECK_EQ(encode_properties(t), "{\"temperature_zones\":[21.0625,22.5,-3.125],\"setpoint\":4}");
  CHECK_EQ(failed, size_t(0));
  t = thermal_properties({21.0625, -127.0, 22.5}, true, 4.0, &failed);
  CHECK_EQ(encode_properties(t), "{\"setpoint\":4}");
  CHECK_EQ(failed, size_t(1));
  CHECK(thermal_properties({NAN}, false, 0, &failed).empty());
  CHECK(thermal_properties({}, false, 0, &failed).empty());
  CHECK(check_properties(thermal_properties({30.5, 31}, false, 0), err));
}

TEST_SUITE(vibration) {
  VibrationWindow w;
  // A 2 m/s^2 square wave on x, gravity on z: rms 2, peak 2, gravity removed.
  for (int i = 0; i < 100; ++i) w.add(i % 2 ? 2.0 : -2.0, 0.0, 9.81);
  CHECK_EQ(w.count(), size_t(100));
  Properties p = w.take();
  CHECK_EQ(encode_properties(p), "{\"rms\":2,\"peak\":2}");
  CHECK_EQ(w.count(), size_t(0));  // a new window
  // A sine of amplitude 1 on y: rms 1/sqrt(2).
  for (int i = 0; i < 1000; ++i) w.add(0.1, std::sin(2 * 3.141592653589793 * i / 50.0), 9.81);
  p = w.take();
  CHECK(std::fabs(p[0].second.number - 0.707) < 0.002);
  CHECK(std::fabs(p[1].second.number - 1.0) < 0.01);
  w.add(NAN, 0, 0);  // failed reads are not part of the window
  w.add(1, 1, 1);
  CHECK_EQ(w.count(), size_t(1));
  CHECK(w.take().empty());  // too few samples
}

TEST_SUITE(ticker) {
  Ticker t(1000);
  CHECK(t.due(5));  // at once
  CHECK(!t.due(500));
  CHECK(t.due(1005));
  CHECK(!t.due(1006));
  CHECK(t.due(2100));  // late but within one interval: keeps the phase
  CHECK(!t.due(2900));
  CHECK(t.due(3005));
  CHECK(t.due(9000));  // a long stall: restart from now, count the missed ticks
  CHECK_EQ(t.skipped(), 4u);
  CHECK(!t.due(9500));
  CHECK(t.due(10000));
  // Across the wrap of millis() after 49.7 days.
  Ticker w(1000);
  CHECK(w.due(4294966000u));
  CHECK(!w.due(4294966500u));
  CHECK(w.due(4294967000u));
  CHECK(!w.due(500u));
  CHECK(w.due(704u));  // 4294968000 mod 2^32
  CHECK_EQ(w.skipped(), 0u);
  w.set_interval(250, 1000);
  CHECK(!w.due(1100));
  CHECK(w.due(1250));
  CHECK_EQ(w.interval(), 250u);
}

TEST_SUITE(identity) {
  CHECK(valid_node_id("oven-001") && valid_node_id("a") && valid_node_id("0_x-y") && valid_node_id(std::string(63, 'a')));
  CHECK(!valid_node_id("") && !valid_node_id("Oven-001") && !valid_node_id("-oven") && !valid_node_id("oven 1") &&
        !valid_node_id("oven.1") && !valid_node_id(std::string(64, 'a')));
  for (const char* t : {"oven", "mixer", "conveyor", "proofer", "cooler"}) CHECK(valid_node_type(t));
  CHECK(!valid_node_type("Oven") && !valid_node_type("") && !valid_node_type("robot"));
  const uint8_t mac[6] = {0x24, 0x6f, 0x28, 0xa1, 0xb2, 0xc3};
  CHECK_EQ(format_mac(mac), "24:6f:28:a1:b2:c3");
  CHECK_EQ(default_node_id("oven", mac), "oven-a1b2c3");
  CHECK(valid_node_id(default_node_id("cooler", mac)));
  CHECK_EQ(default_node_id("??", mac), "node-a1b2c3");
  std::string boot = make_boot_id(42, 0x1f2e3d4c, 0x5b6a7980);
  CHECK_EQ(boot, "0000002a-1f2e3d4c5b6a7980");
  CHECK(boot != make_boot_id(43, 0x1f2e3d4c, 0x5b6a7980));
  CHECK_EQ(encode_info({"oven-001", "oven", "1.0.0", "24:6f:28:a1:b2:c3", false}),
           "{\"id\":\"oven-001\",\"type\":\"oven\",\"fw\":\"1.0.0\",\"mac\":\"24:6f:28:a1:b2:c3\",\"provisioned\":false}");
  CHECK_EQ(encode_http_result(true), "{\"ok\":true}");
  CHECK_EQ(encode_http_result(false, "broker.port must be \"an\" integer"),
           "{\"ok\":false,\"error\":\"broker.port must be \\\"an\\\" integer\"}");
  CHECK(!clock_valid(0) && !clock_valid(86400.0 * 365) && clock_valid(1795440000.0));
}

TEST_SUITE(command_handling) {
  const TypeProfile& oven = *profile_for("oven");
  NodeSettings s = NodeSettings::defaults(oven);
  RecentCommands recent;
  CommandOutcome o = handle_command("{\"cmdId\":\"a\",\"feature\":\"thermal\",\"desiredProperties\":{\"setpoint\":205}}",
                                    oven, s, recent, false);
  CHECK(o.answer && !o.start_update);
  CHECK_EQ(encode_ack(o.ack), "{\"cmdId\":\"a\",\"status\":\"ok\",\"properties\":{\"setpoint\":205}}");
  CHECK_EQ(s.setpoint, 205.0);
  // The broker delivers it again (QoS 1): applied and answered once.
  o = handle_command("{\"cmdId\":\"a\",\"feature\":\"thermal\",\"desiredProperties\":{\"setpoint\":205}}", oven, s,
                     recent, false);
  CHECK(!o.answer && !o.note.empty());
  // Malformed but answerable.
  o = handle_command("{\"cmdId\":\"b\",\"feature\":\"thermal\",\"desiredProperties\":{\"setpoint\":{\"x\":1}}}", oven, s,
                     recent, false);
  CHECK(o.answer && o.ack.status == "rejected" && o.ack.cmd_id == "b" && !o.ack.detail.empty());
  // Not answerable at all.
  o = handle_command("{\"feature\":\"thermal\"}", oven, s, recent, false);
  CHECK(!o.answer && !o.start_update && !o.note.empty());
  o = handle_command(std::string(5000, '{'), oven, s, recent, false);
  CHECK(!o.answer);
  // Updates start without an answer; the update answers later.
  const std::string ota = "{\"cmdId\":\"u\",\"feature\":\"ota\",\"desiredProperties\":{\"url\":\"http://10.0.5.1/fw.bin\","
                          "\"sha256\":\"" + std::string(64, 'a') + "\"}}";
  o = handle_command(ota, oven, s, recent, false);
  CHECK(!o.answer && o.start_update && o.update.url == "http://10.0.5.1/fw.bin" && o.ack.cmd_id == "u");
  RecentCommands other;
  o = handle_command(ota, oven, s, other, true);  // one already running
  CHECK(o.answer && !o.start_update && o.ack.status == "rejected");
  o = handle_command("{\"cmdId\":\"v\",\"feature\":\"ota\",\"desiredProperties\":{\"url\":\"http://x/fw.bin\"}}", oven, s,
                     recent, false);
  CHECK(o.answer && o.ack.status == "rejected" && !o.start_update);
  CHECK_EQ(s.setpoint, 205.0);
}
