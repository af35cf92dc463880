// Helpers shared by the adapter tests (adapter_config_test.cpp,
// peft_adapter_test.cpp): fixture paths, catching a qlora::Error to look at
// its code and message, and comparing tensors bit for bit.
#pragma once

#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include <catch2/catch.hpp>

#include <qlora/core/error.hpp>
#include <qlora/core/tensor.hpp>

namespace qlora::test {

/// tests/data/lora/<name>
inline std::filesystem::path lora_fixture(std::string_view name) {
  return std::filesystem::path(QLORA_TEST_DATA_DIR) / "lora" / name;
}

/// The qlora::Error `action` throws; fails the test when it throws none.
template <class Action>
Error thrown_by(Action&& action) {
  try {
    action();
  } catch (const Error& e) {
    return e;
  }
  FAIL("expected a qlora::Error");
  throw std::logic_error("unreachable");
}

/// Requires `action` to throw a qlora::Error with `code` whose message holds
/// each of `parts` (the file, the key, the shapes...).
template <class Action, class... Parts>
void require_error(Action&& action, std::string_view code, const Parts&... parts) {
  const Error error = thrown_by(std::forward<Action>(action));
  INFO("message: " << error.what());
  CHECK(error.code() == code);
  for (const std::string_view part : {std::string_view(parts)...}) {
    INFO("expected in the message: " << part);
    CHECK(error.message().find(part) != std::string::npos);
  }
}

/// Same dtype, shape and bytes.
inline bool same_bits(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.view().raw_data(), b.view().raw_data(), a.byte_size()) == 0;
}

}  // namespace qlora::test
