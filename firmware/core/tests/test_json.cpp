// JSON: numbers that round-trip in any locale, strict parsing of what the gateway sends, and string
// output that is always valid UTF-8 JSON.
#include <clocale>
#include <cmath>
#include <cstring>

#include "check.h"
#include "egiz/json.h"

using namespace egiz;

TEST_SUITE(json_numbers) {
  CHECK_EQ(format_number(0), "0");
  CHECK_EQ(format_number(-0.0), "0");
  CHECK_EQ(format_number(3), "3");
  CHECK_EQ(format_number(-12), "-12");
  CHECK_EQ(format_number(229.87), "229.87");
  CHECK_EQ(format_number(0.1), "0.1");
  CHECK_EQ(format_number(0.93), "0.93");
  CHECK_EQ(format_number(1795440000.125), "1795440000.125");
  CHECK_EQ(format_number(1795440000123 / 1000.0), "1795440000.123");  // ms time stamps print short
  CHECK_EQ(format_number(1e-7), "1e-07");
  CHECK_EQ(format_number(1e300), "1e+300");
  CHECK_EQ(format_number(9007199254740993.0), "9007199254740992");  // beyond 2^53: still exact text
  CHECK_EQ(format_number(NAN), "null");
  CHECK_EQ(format_number(INFINITY), "null");
  // Every formatted number reads back exactly, over many magnitudes.
  egiz_test::Rng rng(12345);
  for (int i = 0; i < 30000; ++i) {
    double v = (rng.uniform() - 0.5) * std::pow(10.0, static_cast<int>(rng.below(40)) - 20);
    if (i % 3 == 0) {  // arbitrary bit patterns too
      uint64_t bits = rng.next();
      std::memcpy(&v, &bits, sizeof v);
      if (!std::isfinite(v)) continue;
    }
    std::string text = format_number(v);
    double back = 0;
    CHECK(read_number(text, back));
    CHECK(back == v);
    CHECK(text.size() <= 24);
  }
}

TEST_SUITE(json_locale) {
  // A C library set to a decimal-comma locale must not change what goes on the wire or how it is read.
  const char* names[] = {"de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "tr_TR.UTF-8", "de_DE"};
  const char* set = nullptr;
  for (const char* n : names)
    if ((set = std::setlocale(LC_NUMERIC, n)) != nullptr) break;
  if (!set) {
    std::printf("json_locale: no decimal-comma locale installed; checked the C locale only\n");
  } else {
    char probe[16];
    std::snprintf(probe, sizeof probe, "%.1f", 0.5);
    CHECK_EQ(std::string(probe), "0,5");  // the C library really writes a comma now
    std::printf("json_locale: checked under %s\n", set);
  }
  CHECK_EQ(format_number(229.87), "229.87");
  CHECK_EQ(format_number(-0.5), "-0.5");
  double v = 0;
  CHECK(read_number("231.02", v) && v == 231.02);
  Json j;
  std::string err;
  CHECK(parse_json("{\"setpoint\": 210.5}", j, err) && j.get("setpoint")->number == 210.5);
  std::setlocale(LC_NUMERIC, "C");
}

TEST_SUITE(json_parse) {
  Json j;
  std::string err;
  CHECK(parse_json(" {\"a\": [1, 2.5e1, -0.5], \"b\": {\"c\": \"x\\u00e9\\n\"}, \"d\": true, \"e\": null} ", j, err));
  CHECK(err.empty());
  CHECK(j.get("a") && j.get("a")->items.size() == 3 && j.get("a")->items[1].number == 25.0);
  CHECK(j.get("b")->get("c")->text == "x\xc3\xa9\n");
  CHECK(j.get("d")->boolean && j.get("e")->is(Json::Type::Null));
  CHECK(j.get("missing") == nullptr && j.get("a")->get("x") == nullptr);
  CHECK(parse_json("\"\\ud83d\\ude00\"", j, err) && j.text == "\xf0\x9f\x98\x80");
  CHECK(parse_json("\"Ay\xc5\x9f" "e\"", j, err) && j.text == "Ay\xc5\x9f" "e");
  CHECK(parse_json("1e-400", j, err) && j.number == 0.0);  // underflow is zero, as in Python
  const char* bad[] = {"",
                       " ",
                       "{",
                       "[1,]",
                       "{\"a\":1,}",
                       "01",
                       "1.",
                       ".5",
                       "+1",
                       "0x10",
                       "NaN",
                       "Infinity",
                       "-Infinity",
                       "1e999",
                       "\"\\ud800\"",
                       "\"\\udc00\"",
                       "\"\\x41\"",
                       "\"a\x01\"",
                       "\"\xff\"",
                       "\"\xc0\xaf\"",          // overlong '/'
                       "\"\xed\xa0\x80\"",      // an encoded surrogate
                       "\"\xf4\x90\x80\x80\"",  // beyond U+10FFFF
                       "\"abc",
                       "{} x",
                       "tru",
                       "nul",
                       "{\"a\" 1}",
                       "{\"a\":1 \"b\":2}",
                       "{\"a\":1,\"a\":2}",
                       "{1:2}",
                       "[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]"};
  for (const char* b : bad) {
    err.clear();
    bool ok = parse_json(b, j, err);
    CHECK(!ok);
    if (ok) std::fprintf(stderr, "  accepted: %s\n", b);
    CHECK(!err.empty());
    CHECK(j.is(Json::Type::Null));  // nothing half-parsed is left behind
  }
  CHECK(!parse_json(std::string(100, ' ') + "1", j, err, 16, 50));  // over the size limit
  CHECK(err.find("limit") != std::string::npos);
  CHECK(!parse_json(std::string("1\0", 2), j, err));  // an embedded NUL is trailing garbage
}

TEST_SUITE(json_fuzz) {
  // Random bytes and random mutations of valid documents: the parser answers yes or no, never crashes
  // (the host build runs under AddressSanitizer and UndefinedBehaviorSanitizer), and a "yes" parses
  // again identically after being written back.
  const std::string seeds[] = {
      "{\"cmdId\":\"6f1c\",\"feature\":\"thermal\",\"desiredProperties\":{\"setpoint\":210.0},\"ts\":1718000000.25}",
      "{\"site\":\"s\",\"gateway\":\"g\",\"broker\":{\"host\":\"10.0.5.1\",\"port\":1883},\"username\":\"u\"}",
      "[1,-2.5e-3,\"\\u00e9\\ud83d\\ude00\",true,false,null,{\"a\":[[]]}]"};
  egiz_test::Rng rng(99);
  Json j;
  std::string err;
  int accepted = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string s;
    if (i % 4 == 0) {
      size_t n = rng.below(40);
      for (size_t k = 0; k < n; ++k) s += static_cast<char>(rng.below(256));
    } else {
      s = seeds[rng.below(3)];
      int edits = 1 + static_cast<int>(rng.below(4));
      for (int e = 0; e < edits && !s.empty(); ++e) {
        size_t at = rng.below(static_cast<uint32_t>(s.size()));
        switch (rng.below(3)) {
          case 0: s[at] = static_cast<char>(rng.below(256)); break;
          case 1: s.erase(at, 1 + rng.below(3)); break;
          default: s.insert(at, 1, "{}[]\",:\\0e.-u"[rng.below(13)]); break;
        }
      }
    }
    if (parse_json(s, j, err)) {
      ++accepted;
      CHECK(err.empty());
    } else {
      CHECK(!err.empty());
    }
  }
  CHECK(accepted > 100);  // the mutations were not all rejected: both paths ran
}

TEST_SUITE(json_quote) {
  CHECK_EQ(quote("a\"b\\c\n\x02"), "\"a\\\"b\\\\c\\n\\u0002\"");
  CHECK_EQ(quote("simit \"classic\""), "\"simit \\\"classic\\\"\"");
  CHECK_EQ(quote("Ay\xc5\x9f" "e"), "\"Ay\xc5\x9f" "e\"");  // UTF-8 kept as is
  CHECK_EQ(quote("a\xff" "b"), "\"a\xef\xbf\xbd" "b\"");   // invalid byte -> U+FFFD
  CHECK_EQ(quote("\xe2\x82"), "\"\xef\xbf\xbd\xef\xbf\xbd\"");  // truncated sequence
  CHECK_EQ(utf8_length("Ay\xc5\x9f" "e"), size_t(4));
  CHECK_EQ(utf8_length("\xf0\x9f\x98\x80"), size_t(1));
  // Whatever bytes go in, the output parses back (as the gateway would decode it).
  egiz_test::Rng rng(7);
  Json j;
  std::string err;
  for (int i = 0; i < 5000; ++i) {
    std::string s;
    size_t n = rng.below(24);
    for (size_t k = 0; k < n; ++k) s += static_cast<char>(rng.below(256));
    CHECK(parse_json(quote(s), j, err));
    CHECK(j.is(Json::Type::String));
  }
}
