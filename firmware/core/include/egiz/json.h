// Minimal JSON for the node: a strict parser for what the gateway sends (commands, the provisioning
// document) and the writers the payload encoder uses. Plain C++17, no Arduino headers, so the same
// code is tested on a PC and runs on the ESP32.
#pragma once

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace egiz {

struct Json {
  enum class Type { Null, Bool, Number, String, Array, Object };
  Type type = Type::Null;
  bool boolean = false;
  double number = 0.0;
  std::string text;                                   // String (UTF-8)
  std::vector<Json> items;                            // Array
  std::vector<std::pair<std::string, Json>> members;  // Object, in document order, keys unique

  const Json* get(const std::string& key) const;  // nullptr when absent or not an object
  bool is(Type t) const { return type == t; }
};

// Parse `input` into `out`. False, with a reason and byte offset in `error`, for anything that is not
// exactly one valid JSON value: trailing bytes, NaN/Infinity, numbers beyond the double range, invalid
// UTF-8, bad escapes or lone surrogates, duplicate keys, nesting deeper than `max_depth`, or more than
// `max_bytes` of input. Never throws on bad input (only std::bad_alloc could escape).
bool parse_json(const std::string& input, Json& out, std::string& error, int max_depth = 16,
                size_t max_bytes = 16384);

// The shortest decimal text that reads back as exactly `v` (17 significant digits at worst),
// independent of the C locale; integral values below 2^53 without a fraction ("3", not "3.0").
// Non-finite values have no JSON form: "null" (the encoder never writes them; see payload.h).
std::string format_number(double v);

// `s` as a JSON string literal, quotes included. Control characters are escaped; invalid UTF-8 is
// replaced by U+FFFD so the output is always valid JSON the gateway can decode.
std::string quote(const std::string& s);

// Number of Unicode code points of valid UTF-8 `s` (what the gateway's string limits count).
size_t utf8_length(const std::string& s);

// Read a decimal number the way format_number writes it, independent of the C locale.
// False unless all of `text` is a finite number.
bool read_number(const std::string& text, double& out);

}  // namespace egiz
