// Minimal native test harness: one program per component, one function per behaviour, named for it.
// Exit codes follow liburing's convention: 0 pass, 1 fail, 77 skip (all tests skipped).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace check {
enum Result { PASS = 0, FAIL = 1, SKIP = 77 };
struct Case { const char* name; std::function<Result()> fn; };
inline std::vector<Case>& registry() { static std::vector<Case> r; return r; }
struct Register { Register(const char* n, std::function<Result()> f) { registry().push_back({n, f}); } };
inline int run_all(int argc, char** argv) {
  int failed = 0, passed = 0, skipped = 0;
  for (auto& c : registry()) {
    if (argc > 1 && std::string(argv[1]) != c.name) continue;
    Result r = c.fn();
    const char* tag = r == PASS ? "PASS" : r == SKIP ? "SKIP" : "FAIL";
    std::printf("%s %s\n", tag, c.name);
    std::fflush(stdout);
    (r == PASS ? passed : r == SKIP ? skipped : failed)++;
  }
  std::printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
  return failed ? FAIL : (passed ? PASS : SKIP);
}
}  // namespace check

#define TEST(name) \
  static check::Result name(); \
  static check::Register reg_##name(#name, name); \
  static check::Result name()
#define EXPECT(cond) \
  do { if (!(cond)) { std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); return check::FAIL; } } while (0)
#define TEST_MAIN() int main(int argc, char** argv) { return check::run_all(argc, argv); }
