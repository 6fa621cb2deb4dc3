// A tiny test harness for the host tests: suites register themselves, CHECK/CHECK_EQ count and report
// failures with file and line, and main() runs the suites named on the command line (all by default).
#pragma once

#include <cstdint>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

namespace egiz_test {

struct Suite {
  const char* name;
  void (*run)();
};
std::vector<Suite>& suites();
struct Register {
  Register(const char* name, void (*run)()) { suites().push_back({name, run}); }
};

extern int failures;
extern int checks;

void fail(const char* file, int line, const std::string& message);

template <typename T>
std::string show(const T& v) {
  std::ostringstream out;
  out << v;
  return out.str();
}
inline std::string show(const std::string& v) { return "\"" + v + "\""; }
inline std::string show(const char* v) { return show(std::string(v)); }
inline std::string show(bool v) { return v ? "true" : "false"; }
inline std::string show(uint8_t v) { return std::to_string(v); }

template <typename A, typename B>
void check_eq(const A& a, const B& b, const char* ea, const char* eb, const char* file, int line) {
  ++checks;
  if (!(a == b)) fail(file, line, std::string(ea) + " == " + eb + ": " + show(a) + " != " + show(b));
}

// A small deterministic generator for the randomised tests (the same cases every run).
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed ? seed : 1) {}
  uint64_t next() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  }
  uint32_t below(uint32_t n) { return n ? static_cast<uint32_t>(next() % n) : 0; }
  double uniform() { return static_cast<double>(next() >> 11) / 9007199254740992.0; }
};

}  // namespace egiz_test

#define TEST_SUITE(name)                                          \
  static void name();                                             \
  static const egiz_test::Register register_##name(#name, name); \
  static void name()

#define CHECK(cond)                                                          \
  do {                                                                       \
    ++egiz_test::checks;                                                     \
    if (!(cond)) egiz_test::fail(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_EQ(a, b) egiz_test::check_eq((a), (b), #a, #b, __FILE__, __LINE__)
