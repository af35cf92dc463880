// Helpers shared by the data/ tests. (tests/data/ is both the fixture root and
// the data/ layer's test folder: the layer's fixtures are in tests/data/data/.)
#pragma once

#include <filesystem>
#include <string_view>

#include "support/errors.hpp"  // thrown_by, require_error

namespace qlora::test {

/// tests/data/data/<name>
inline std::filesystem::path data_fixture(std::string_view name) {
  return std::filesystem::path(QLORA_TEST_DATA_DIR) / "data" / name;
}

}  // namespace qlora::test
