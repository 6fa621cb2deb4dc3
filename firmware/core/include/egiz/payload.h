// Telemetry, status and command-ack payloads exactly as the gateway's contract defines them
// (docs/topics.md):
//   {"ts":<epoch s>,"seq":<n>,"boot":"<id>","properties":{...}}
//   {"boot":"<id>","samples":[{"ts":..,"seq":..,"properties":{...}}, ...]}
//   {"state":"online"|"offline","fw":"..","ts":..}          (the Last Will carries no ts)
//   {"cmdId":"..","status":"ok"|"error"|"rejected","properties":{...},"detail":".."}
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace egiz {

// The gateway's limits (docs/topics.md, "Validation limits").
constexpr size_t kMaxProperties = 256;
constexpr size_t kMaxStringChars = 256;
constexpr size_t kMaxArray = 64;
constexpr size_t kMaxNamed = 32;
constexpr size_t kMaxFwChars = 64;

// One property value: a number, a string, a boolean, an array of numbers (temperature_zones) or one
// level of named numbers (voltage: {a, b, c}).
struct Value {
  enum class Kind { Number, Text, Flag, Numbers, Named };
  Kind kind = Kind::Number;
  double number = 0.0;
  std::string text;
  bool flag = false;
  std::vector<double> numbers;
  std::vector<std::pair<std::string, double>> named;

  static Value of(double v);
  static Value of_text(std::string v);
  static Value of_flag(bool v);
  static Value of_numbers(std::vector<double> v);
  static Value of_named(std::vector<std::pair<std::string, double>> v);
};

using Properties = std::vector<std::pair<std::string, Value>>;  // written in this order

struct Sample {
  double ts = 0.0;    // epoch seconds from the synchronised clock, fractions allowed
  uint64_t seq = 0;   // +1 per sample since boot
  Properties properties;
};

// A sample whose properties are already encoded (as kept in the outage ring).
struct EncodedSample {
  double ts = 0.0;
  uint64_t seq = 0;
  std::string properties;  // a JSON object, from encode_properties()
};

// One stored point as the gateway flattens it: `voltage.a`, `temperature_zones[1]`, `power_kw`.
struct Point {
  std::string path;
  Value value;  // Number, Text or Flag
};

// `^[A-Za-z_][A-Za-z0-9_]{0,63}$`: property, feature and named-number names.
bool valid_name(const std::string& name);

// True when the gateway accepts `props` (names, 1-256 entries, finite numbers, string and array
// limits); otherwise false with the first problem in `error`.
bool check_properties(const Properties& props, std::string& error);

// A sensor that failed to read gives NaN. JSON has no NaN and the gateway rejects a whole message for
// one, so failed values are left out: a failed number drops its property, a failed named number drops
// its entry (`voltage.c` stays `voltage.c` when `b` is missing), and an array with a failed element is
// dropped whole (its indices must keep meaning the same zone). `dropped` counts what was left out.
Properties without_failed_values(const Properties& props, size_t* dropped = nullptr);

std::string encode_properties(const Properties& props);
std::string encode_sample(const Sample& s, const std::string& boot);
std::string encode_sample(const EncodedSample& s, const std::string& boot);
std::string encode_batch(const std::vector<Sample>& samples, const std::string& boot);
std::string encode_batch(const std::vector<EncodedSample>& samples, const std::string& boot);
// Bytes encode_batch() adds around one sample's properties (for sizing batches); an upper bound.
constexpr size_t kSampleOverheadBytes = 64;

// ts < 0: no "ts" (the Last Will, registered before the state changes).
std::string encode_status(bool online, const std::string& fw, double ts);

struct Ack {
  std::string cmd_id;
  std::string status = "ok";  // ok | error | rejected
  Properties properties;      // the values the node now reports for the feature; omitted when empty
  std::string detail;         // for people, omitted when empty
};
std::string encode_ack(const Ack& ack);

std::vector<Point> flatten(const Properties& props);

}  // namespace egiz
