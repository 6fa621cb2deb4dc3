// Runs the host test suites: `core_tests` runs them all, `core_tests json_parse ring_model` only those
// named. `core_tests vectors DIR` checks the golden vectors (vectors.cpp); `core_tests answer TYPE`
// answers one command read on stdin (node_cli.cpp).
#include <cstring>

#include "check.h"

namespace egiz_test {

int failures = 0;
int checks = 0;

std::vector<Suite>& suites() {
  static std::vector<Suite> all;
  return all;
}

void fail(const char* file, int line, const std::string& message) {
  ++failures;
  std::fprintf(stderr, "%s:%d: %s\n", file, line, message.c_str());
}

}  // namespace egiz_test

int vectors_main(int argc, char** argv);
int answer_main(int argc, char** argv);

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "vectors") == 0) return vectors_main(argc - 1, argv + 1);
  if (argc > 1 && std::strcmp(argv[1], "answer") == 0) return answer_main(argc - 1, argv + 1);
  if (argc > 1 && std::strcmp(argv[1], "--list") == 0) {  // every suite, one per line
    for (const auto& s : egiz_test::suites()) std::printf("%s\n", s.name);
    return 0;
  }
  int ran = 0;
  for (const auto& s : egiz_test::suites()) {
    bool wanted = argc == 1;
    for (int i = 1; i < argc; ++i) wanted = wanted || std::strcmp(argv[i], s.name) == 0;
    if (!wanted) continue;
    int before = egiz_test::failures;
    s.run();
    ++ran;
    std::printf("%-14s %s\n", s.name, egiz_test::failures == before ? "ok" : "FAILED");
  }
  if (ran == 0 || ran < argc - 1) {
    std::fprintf(stderr, "unknown suite; known:");
    for (const auto& s : egiz_test::suites()) std::fprintf(stderr, " %s", s.name);
    std::fprintf(stderr, "\n");
    return 2;
  }
  std::printf("%d checks, %d failed\n", egiz_test::checks, egiz_test::failures);
  return egiz_test::failures ? 1 : 0;
}
