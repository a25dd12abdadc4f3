// Helpers shared by the C++ test files.
#ifndef ROPEKIT_TESTS_TEST_UTIL_H_
#define ROPEKIT_TESTS_TEST_UTIL_H_

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

namespace ropekit::testing {

// n byte tokens, uniform in [0, 256), from a fixed seed.
inline std::vector<int32_t> RandomTokens(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> dist(0, 255);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = dist(gen);
  return t;
}

// A path in the temporary directory, unique to this process, that does not exist yet.
inline std::string FreshTempPath(const std::string& prefix, const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() /
                   (prefix + "_" + name + "_" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  return dir.string();
}

}  // namespace ropekit::testing

#endif  // ROPEKIT_TESTS_TEST_UTIL_H_
