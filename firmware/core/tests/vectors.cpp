// Golden payload vectors (tests/vectors/*.json at the repository root), shared with the gateway's
// Python tests. Each file holds a topic, the exact payload this core emits for it, and what the
// gateway must make of it: the stored points (feature, flattened path, value, ts, seq, boot), the
// status, or the command acknowledgement.
//
//   core_tests vectors DIR            check that every file equals what the code produces now
//   core_tests vectors DIR --write    (or EGIZ_WRITE_VECTORS=1) rewrite them after an intended change
//
// The payloads come from the same path the firmware uses: readings are built by readings.h, kept in
// the outage ring and drained by the uplink; acks come from parsing the command text exactly as the
// gateway publishes it and applying it.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "egiz/commands.h"
#include "egiz/json.h"
#include "egiz/payload.h"
#include "egiz/production.h"
#include "egiz/readings.h"
#include "egiz/ring.h"
#include "egiz/topics.h"
#include "egiz/uplink.h"

using namespace egiz;

namespace {

const char* const kSite = "izmir-bakery";
const char* const kFw = "1.2.0";

struct Vector {
  std::string name, about, topic, payload;
  std::string expect;  // the "points" / "status" / "command"+"ack" members, already formatted
};

std::string value_json(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Text: return quote(v.text);
    case Value::Kind::Flag: return v.flag ? "true" : "false";
    default: return format_number(v.number);
  }
}

// The points the gateway must store for one message: every flattened property of every sample.
std::string points_json(const std::string& feature, const std::string& boot, const std::vector<Sample>& samples) {
  std::string out = "\"points\": [";
  bool first = true;
  for (const auto& s : samples) {
    for (const auto& p : flatten(s.properties)) {
      out += first ? "\n" : ",\n";
      first = false;
      out += "    {\"feature\": " + quote(feature) + ", \"path\": " + quote(p.path) + ", \"value\": " + value_json(p.value) +
             ", \"ts\": " + format_number(s.ts) + ", \"seq\": " + std::to_string(s.seq) + ", \"boot\": " + quote(boot) +
             "}";
    }
  }
  return out + "\n  ]";
}

// A node's uplink: readings go through the ring and leave as the firmware sends them.
struct Node {
  std::string prefix, boot;
  ReadingRing ring{16 * 1024};
  Uplink uplink;
  int msg_id = 0;
  Node(const std::string& type, const std::string& id, const std::string& boot_id)
      : prefix(topic_prefix(kSite, type, id)), boot(boot_id), uplink(boot_id) {
    uplink.set_topic_prefix(prefix);
  }
  void read(const std::string& feature, int64_t ts_ms, const Properties& props, std::vector<Sample>& kept) {
    std::string err;
    if (!check_properties(props, err)) {
      std::fprintf(stderr, "invalid properties for %s: %s\n", feature.c_str(), err.c_str());
      std::abort();
    }
    ring.push(feature, ts_ms, encode_properties(props));
    kept.push_back({static_cast<double>(ts_ms) / 1000.0, 0, props});
  }
  // Drain one message; the expected samples get the seq the uplink gave them.
  Outgoing send(std::vector<Sample>& samples) {
    const Outgoing* m = uplink.next(ring, 0);
    if (!m || m->samples != samples.size()) {
      std::fprintf(stderr, "the uplink did not drain the expected message\n");
      std::abort();
    }
    Outgoing out = *m;
    for (size_t i = 0; i < samples.size(); ++i) samples[i].seq = out.first_seq + i;
    uplink.published(++msg_id, 0);
    uplink.confirmed(msg_id);
    return out;
  }
};

Vector telemetry(Node& node, const std::string& name, const std::string& about, const std::string& feature,
                 std::vector<Sample> samples) {
  Outgoing m = node.send(samples);
  return {name, about, m.topic, m.payload, points_json(feature, node.boot, samples)};
}

// The command exactly as the gateway publishes it (json.dumps of cmdId, feature, desiredProperties,
// ts), the ack the node answers with, and what the gateway reads from that ack.
Vector command(const std::string& name, const std::string& about, const std::string& prefix, const TypeProfile& profile,
               const std::string& cmd_id, const std::string& feature, const std::string& desired_json) {
  std::string text = "{\"cmdId\": " + quote(cmd_id) + ", \"feature\": " + quote(feature) +
                     ", \"desiredProperties\": " + desired_json + ", \"ts\": 1718000003.5}";
  Command cmd;
  std::string err;
  Ack ack;
  NodeSettings settings = NodeSettings::defaults(profile);
  if (parse_command(text, cmd, err) != CommandParse::Ok) {
    std::fprintf(stderr, "the command of %s does not parse: %s\n", name.c_str(), err.c_str());
    std::abort();
  }
  ack = apply_command(cmd, profile, settings);
  std::string expect = "\"command\": " + quote(text) + ",\n  \"ack\": {\"cmdId\": " + quote(ack.cmd_id) +
                       ", \"status\": " + quote(ack.status) + ", \"properties\": " +
                       (ack.properties.empty() ? "null" : encode_properties(ack.properties)) +
                       ", \"detail\": " + (ack.detail.empty() ? "null" : quote(ack.detail)) + "}";
  return {name, about, ack_topic(prefix), encode_ack(ack), expect};
}

std::vector<Vector> all_vectors() {
  std::vector<Vector> out;
  const TypeProfile& oven = *profile_for("oven");

  // An oven node: its messages in the order it sends them, seq rising across features.
  Node o("oven", "oven-001", "0000002a-1f2e3d4c5b6a7980");
  std::vector<Sample> s;
  o.read("thermal", 1718000000125,
         {{"temperature_zones", Value::of_numbers({187.25, 190.5, 192.75})},
          {"setpoint", Value::of(NodeSettings::defaults(oven).setpoint)}},
         s);
  out.push_back(telemetry(o, "oven_thermal", "an oven's zone temperatures (an array) and setpoint", "thermal", s));
  s.clear();
  o.read("electrical", 1718000000250,
         electrical_properties({{true, 229.9f, 14.21f, 3038.2f, 0.93f},
                                {true, 230.4f, 14.05f, 3010.5f, 0.93f},
                                {true, 231.0f, 14.33f, 3078.5f, 0.92f}}),
         s);
  out.push_back(telemetry(o, "oven_electrical", "three PZEM-004T phases: voltage and current {a,b,c}, power factor, power",
                          "electrical", s));
  s.clear();
  o.read("electrical", 1718000001250,
         electrical_properties({{true, 229.8f, 14.19f, 3032.6f, 0.93f},
                                {false, 0, 0, 0, 0},
                                {true, 231.1f, 14.36f, 3086.3f, 0.93f}}),
         s);
  out.push_back(telemetry(o, "oven_electrical_phase_lost",
                          "the meter of phase b did not answer: it is left out, a and c keep their names", "electrical",
                          s));
  s.clear();
  o.read("business_context", 1718000002000,
         {{"batch_id", Value::of_text("B-2026-11-23-07")},
          {"recipe", Value::of_text("simit \"classic\"")},
          {"door_open", Value::of_flag(false)},
          {"heating", Value::of_flag(true)},
          {"operator", Value::of_text("Ay\xc5\x9f" "e")}},
         s);
  out.push_back(telemetry(o, "oven_business_context", "strings (quotes, UTF-8) and booleans", "business_context", s));

  // An oven's production counters and state, as its PLC reports them: 16-bit words that have rolled over.
  ProductionCounter counter;
  counter.update(65530, 3, MachineSignals{true, false, false}, 1000);
  counter.update(42, 1, MachineSignals{true, false, false}, 2000);
  s.clear();
  o.read("production", 1718000002500, counter.properties("simit"), s);
  out.push_back(telemetry(o, "oven_production", "good and reject counters (rolled over at 65,536), state and recipe",
                          "production", s));

  // A mixer that lost its broker for a while: five vibration windows kept in the ring and drained as
  // one batch after the reconnect.
  Node m("mixer", "mixer-002", "00000007-9a8b7c6d5e4f3021");
  s.clear();
  for (int k = 0; k < 5; ++k) {
    VibrationWindow w;
    for (int i = 0; i < 200; ++i) {
      double phase = 2 * 3.141592653589793 * i / 20.0;
      w.add(0.3 + (1.0 + 0.25 * k) * std::sin(phase), 0.1 * std::cos(phase), 9.81);
    }
    m.read("vibration", 1718000001000 + k * 500, w.take(), s);
  }
  std::vector<Sample> later;  // another feature sampled meanwhile: it stays for the next message
  m.read("electrical", 1718000003400, electrical_properties({{true, 231.2f, 4.2f, 776.7f, 0.8f}}), later);
  out.push_back(telemetry(m, "mixer_vibration_batch",
                          "readings kept in the ring during an outage, drained oldest first as one batch of one feature",
                          "vibration", s));

  // A cooler's DS18B20 probes (below zero) under its climate feature.
  Node c("cooler", "cooler-003", "00000001-0011223344556677");
  const TypeProfile& cooler = *profile_for("cooler");
  s.clear();
  c.read(cooler.thermal_feature, 1718000000500,
         thermal_properties({2.5625, 3.125, -0.0625}, true, NodeSettings::defaults(cooler).setpoint), s);
  out.push_back(telemetry(c, "cooler_climate", "DS18B20 zones of a cooler (1/16 degree steps) and its setpoint",
                          cooler.thermal_feature, s));

  out.push_back({"oven_status_online", "the retained status published after connecting", status_topic(o.prefix),
                 encode_status(true, kFw, 1718000000.0),
                 "\"status\": {\"state\": \"online\", \"fw\": " + quote(kFw) + ", \"ts\": 1718000000}"});
  out.push_back({"oven_last_will", "the retained Last Will the broker publishes when the node disappears",
                 status_topic(o.prefix), encode_status(false, kFw, -1),
                 "\"status\": {\"state\": \"offline\", \"fw\": " + quote(kFw) + ", \"ts\": null}"});

  out.push_back(command("oven_command_ack", "a setpoint command applied: ok with the value now reported", o.prefix, oven,
                        "6f1c2d0e9a8b4c7d8e5f4a3b2c1d0e9f", "thermal", "{\"setpoint\": 210.0}"));
  out.push_back(command("oven_command_sampling_ack", "a sampling rate command applied", o.prefix, oven,
                        "0a1b2c3d4e5f60718293a4b5c6d7e8f9", "sampling", "{\"rate_hz\": 2}"));
  out.push_back(command("oven_command_rejected", "a command with a property the node does not have changes nothing",
                        o.prefix, oven, "4f1c2b0000000000000000000000000b", "thermal",
                        "{\"setpoint\": 210.0, \"fan_speed\": 3}"));
  return out;
}

std::string file_text(const Vector& v) {
  return "{\n  \"name\": " + quote(v.name) + ",\n  \"about\": " + quote(v.about) + ",\n  \"topic\": " + quote(v.topic) +
         ",\n  \"payload\": " + quote(v.payload) + ",\n  " + v.expect + "\n}\n";
}

}  // namespace

int vectors_main(int argc, char** argv) {
  std::string dir;
  bool write = false;
  const char* env = std::getenv("EGIZ_WRITE_VECTORS");
  if (env && *env && std::strcmp(env, "0") != 0) write = true;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--write") == 0) write = true;
    else dir = argv[i];
  }
  if (dir.empty()) {
    std::fprintf(stderr, "usage: core_tests vectors DIR [--write]\n");
    return 2;
  }
  namespace fs = std::filesystem;
  std::error_code ec;
  if (write) fs::create_directories(dir, ec);
  int bad = 0;
  std::set<std::string> produced;
  std::vector<Vector> vectors = all_vectors();
  for (const auto& v : vectors) {
    const std::string path = (fs::path(dir) / (v.name + ".json")).string(), text = file_text(v);
    produced.insert(v.name + ".json");
    Json parsed;
    std::string err;
    if (!parse_json(text, parsed, err, 16, 1 << 20)) {  // the file itself must be valid JSON
      std::fprintf(stderr, "%s: not valid JSON: %s\n", path.c_str(), err.c_str());
      ++bad;
      continue;
    }
    if (write) {
      std::ofstream(path, std::ios::binary) << text;
      std::printf("wrote %s\n", path.c_str());
      continue;
    }
    std::ifstream in(path, std::ios::binary);
    std::stringstream have;
    if (in.is_open()) have << in.rdbuf();
    if (!in.is_open()) {
      std::fprintf(stderr, "%s: missing (write it with --write)\n", path.c_str());
      ++bad;
    } else if (have.str() != text) {
      std::fprintf(stderr, "%s differs from what the encoder produces now:\n%s", path.c_str(), text.c_str());
      ++bad;
    }
  }
  // A vector the code no longer produces is stale: it would keep testing the gateway against a payload
  // no node sends.
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    std::string file = entry.path().filename().string();
    if (entry.path().extension() == ".json" && !produced.count(file)) {
      std::fprintf(stderr, "%s: not produced by the encoder any more; remove it\n", entry.path().string().c_str());
      ++bad;
    }
  }
  if (ec) {
    std::fprintf(stderr, "%s: %s\n", dir.c_str(), ec.message().c_str());
    ++bad;
  }
  std::printf("%zu golden vectors %s, %d problems%s\n", vectors.size(), write ? "written" : "checked", bad,
              bad && !write ? " (after an intended change: core_tests vectors DIR --write, then review the diff)" : "");
  return bad ? 1 : 0;
}
