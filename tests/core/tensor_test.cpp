#include <qlora/core/tensor.hpp>

#include <catch2/catch.hpp>

using namespace qlora;

TEST_CASE("Tensor owns aligned zeroed memory and gives typed views") {
  Tensor t(DType::BF16, {3, 5});
  CHECK(t.numel() == 15);
  CHECK(t.byte_size() == 30);
  CHECK(reinterpret_cast<std::uintptr_t>(t.view().raw_data()) % Tensor::alignment == 0);
  auto values = t.span<bf16>();
  REQUIRE(values.size() == 15);
  for (auto v : values) CHECK(v.bits == 0);
  CHECK(t.view().stride(0) == 5);
  CHECK(t.view().stride(1) == 1);
  CHECK(t.view().is_contiguous());
  try {
    (void)t.span<float>();
    FAIL("accessing BF16 data as float did not throw");
  } catch (const Error& e) {
    CHECK(e.code() == "DTypeMismatch");
  }
  Tensor moved = std::move(t);
  CHECK(moved.numel() == 15);
}

TEST_CASE("transposed views swap extents and strides") {
  Tensor t(DType::F32, {2, 3});
  auto data = t.span<float>();
  for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<float>(i);
  const TensorView tv = t.view().transposed(0, 1);
  CHECK(tv.shape() == Shape{3, 2});
  CHECK(tv.stride(0) == 1);
  CHECK(tv.stride(1) == 3);
  CHECK(!tv.is_contiguous());
  const float* base = tv.data<float>();
  CHECK(base[2 * tv.stride(0) + 1 * tv.stride(1)] == 5.0f);  // tv[2][1] == t[1][2]
  CHECK_THROWS_AS(tv.span<float>(), Error);
  CHECK_THROWS_AS(t.view().transposed(0, 2), Error);
}

TEST_CASE("shapes reject negative extents and too many dimensions") {
  CHECK_THROWS_AS((Shape{2, -1}), Error);
  CHECK_THROWS_AS((Shape{1, 1, 1, 1, 1, 1, 1, 1, 1}), Error);
  CHECK(Shape{4, 0}.numel() == 0);
  CHECK(Shape{2, 3}.to_string() == "[2, 3]");
}
