// SafetensorsTensor's typed access: copies of any alignment, zero-copy views
// only where aligned, dtype checks, and bool bytes that are neither 0 nor 1.
#include <qlora/io/safetensors_tensor.hpp>

#include <array>
#include <cstddef>
#include <cstring>
#include <span>
#include <vector>

#include <catch2/catch.hpp>

using qlora::DType;
using qlora::Error;
using qlora::SafetensorsTensor;

namespace {

/// Three floats stored at `offset` bytes into a buffer aligned for double.
struct Floats {
  alignas(8) std::array<std::byte, 16> buffer{};
  SafetensorsTensor at(std::size_t offset) {
    const float values[3] = {1.5f, -2.0f, 0.25f};
    std::memcpy(buffer.data() + offset, values, sizeof values);
    return {"x", DType::F32, {3}, std::span<const std::byte>(buffer).subspan(offset, sizeof values)};
  }
};

}  // namespace

TEST_CASE("read copies the elements whatever their alignment") {
  Floats storage;
  for (std::size_t offset : {0, 1, 2, 3}) {
    CHECK(storage.at(offset).read<float>() == std::vector<float>{1.5f, -2.0f, 0.25f});
  }
}

TEST_CASE("view is zero-copy where aligned and refuses, pointing to read, where not") {
  Floats storage;
  const SafetensorsTensor aligned = storage.at(4);
  const std::span<const float> view = aligned.view<float>();
  CHECK(static_cast<const void*>(view.data()) == static_cast<const void*>(aligned.data.data()));
  CHECK(std::vector<float>(view.begin(), view.end()) == std::vector<float>{1.5f, -2.0f, 0.25f});
  try {
    (void)storage.at(2).view<float>();
    FAIL("an unaligned view did not throw");
  } catch (const Error& e) {
    CHECK(e.code() == "UnalignedTensor");
    CHECK_THAT(e.what(), Catch::Contains("`x`") && Catch::Contains("4-byte") && Catch::Contains("read<T>()"));
  }
  const SafetensorsTensor empty{"e", DType::F32, {0, 2}, {}};
  CHECK(empty.view<float>().empty());
  CHECK(empty.read<float>().empty());
  CHECK(empty.numel() == 0);
}

TEST_CASE("typed access checks the dtype") {
  Floats storage;
  try {
    (void)storage.at(0).read<std::int32_t>();
    FAIL("read<int32_t> of F32 did not throw");
  } catch (const Error& e) {
    CHECK(e.code() == "DTypeMismatch");
    CHECK(e.message() == "tensor `x` holds F32 elements, not I32");
  }
  CHECK_THROWS_AS(storage.at(0).view<qlora::bf16>(), Error);
}

TEST_CASE("bool reads any nonzero byte as true") {
  const std::array<std::byte, 4> bytes{std::byte{0}, std::byte{1}, std::byte{2}, std::byte{0xFF}};
  const SafetensorsTensor flags{"flags", DType::BOOL, {2, 2}, bytes};
  CHECK(flags.read<bool>() == std::vector<bool>{false, true, true, true});
  CHECK(flags.numel() == 4);
}

TEST_CASE("a scalar has one element") {
  const std::array<std::byte, 2> bytes{std::byte{0x80}, std::byte{0x3F}};  // bf16 1.0
  const SafetensorsTensor scalar{"s", DType::BF16, {}, bytes};
  CHECK(scalar.numel() == 1);
  CHECK(scalar.read<qlora::bf16>().at(0).to_float() == 1.0f);
}
