// The version is written three times (version.hpp, CMakeLists.txt,
// meson.build); this test reads the two build files and fails if any differ.
#include <qlora/version.hpp>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <fstream>
#include <regex>
#include <sstream>
#include <string>

namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  REQUIRE(in.good());
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string first_match(const std::string& text, const std::regex& pattern) {
  std::smatch match;
  REQUIRE(std::regex_search(text, match, pattern));
  return match[1].str();
}

}  // namespace

TEST_CASE("version.hpp, CMakeLists.txt and meson.build carry one version") {
  constexpr auto v = qlora::version();
  const std::string header_version = fmt::format("{}.{}.{}", v.major, v.minor, v.patch);
  STATIC_REQUIRE(QLORA_VERSION == v.major * 10000 + v.minor * 100 + v.patch);

  const std::string cmake = read_text(QLORA_SOURCE_DIR "/CMakeLists.txt");
  CHECK(first_match(cmake, std::regex(R"(project\(qlora\s+VERSION\s+([0-9.]+))")) == header_version);

  const std::string meson = read_text(QLORA_SOURCE_DIR "/meson.build");
  CHECK(first_match(meson, std::regex(R"(version\s*:\s*'([0-9.]+)')")) == header_version);
}
