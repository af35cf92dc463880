// Helpers shared by the adapter tests (adapter_config_test.cpp,
// peft_adapter_test.cpp): fixture paths, catching a qlora::Error to look at
// its code and message, and comparing tensors bit for bit.
#pragma once

#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>

#include <catch2/catch.hpp>

#include <qlora/core/tensor.hpp>

#include "support/errors.hpp"  // thrown_by, require_error: the adapter tests use both

namespace qlora::test {

/// tests/data/lora/<name>
inline std::filesystem::path lora_fixture(std::string_view name) {
  return std::filesystem::path(QLORA_TEST_DATA_DIR) / "lora" / name;
}

/// Same dtype, shape and bytes.
inline bool same_bits(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         std::memcmp(a.view().raw_data(), b.view().raw_data(), a.byte_size()) == 0;
}

}  // namespace qlora::test
