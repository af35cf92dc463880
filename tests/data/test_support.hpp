// Helpers shared by the data/ tests. (tests/data/ is both the fixture root and
// the data/ layer's test folder: the layer's fixtures are in tests/data/data/.)
#pragma once

#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <qlora/data/tokenizer.hpp>
#include <qlora/io/detail/json.hpp>

#include "support/errors.hpp"  // thrown_by, require_error

namespace qlora::test {

/// tests/data/data/<name>
inline std::filesystem::path data_fixture(std::string_view name) {
  return std::filesystem::path(QLORA_TEST_DATA_DIR) / "data" / name;
}

/// The text of a tokenizer fixture entry, recorded as a list of byte values
/// (some hostile-corpus entries are not UTF-8, which JSON strings cannot hold).
inline std::string bytes_of(const detail::Json& entry) {
  std::string text;
  for (const detail::Json& byte : entry["bytes"]) text += static_cast<char>(byte.get<int>());
  return text;
}

inline std::vector<TokenId> ids_of(const detail::Json& list) { return list.get<std::vector<TokenId>>(); }

}  // namespace qlora::test
