// embedding_forward / embedding_backward against
// torch.nn.functional.embedding (tests/reference/nn_elementwise.py: the
// lookup and the autograd gradient of the table, with repeated ids, a single
// token and a padding_idx), plus determinism across thread counts and bad ids.
//
// Tolerance: none. The forward copies rows; the backward adds each token's
// gradient into a zero table in token order in fp32, as torch's CPU
// index_add does, so every value is bit-identical.
#include <qlora/nn/embedding.hpp>

#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "nn/elementwise_fixture.hpp"
#include "support/errors.hpp"
#include "support/tensors.hpp"

using namespace qlora;
using test::fixture_tensor;
using test::require_error;
using test::require_identical;

TEST_CASE("embedding matches torch.nn.functional.embedding forward and backward", "[nn][embedding]") {
  for (const auto& c : test::fixture_cases("embedding")) {
    const std::string name = c.at("name");
    SECTION(name) {
      const Tensor table = fixture_tensor(name, "table"), dout = fixture_tensor(name, "dout");
      const std::vector<std::int32_t> ids = test::fixture_ids(name);
      Tensor out(DType::F32, dout.shape());
      embedding_forward(table.view(), ids, out.view(), 1);
      require_identical(out.view(), fixture_tensor(name, "out").view(), name + " out");

      Tensor dtable(DType::F32, table.shape());
      if (c.at("padding_idx").is_null()) {
        embedding_backward(ids, dout.view(), dtable.view(), 1);
      } else {
        embedding_backward(ids, dout.view(), dtable.view(), EmbeddingPadding{c.at("padding_idx").get<std::int32_t>()}, 1);
      }
      require_identical(dtable.view(), fixture_tensor(name, "dtable").view(), name + " dtable");
    }
  }
}

TEST_CASE("embedding_backward accumulates and is deterministic across thread counts", "[nn][embedding]") {
  // 600 tokens over a 50-row table: every row repeats ~12 times; 600 x 96 is split among threads.
  const std::int64_t vocab = 50, hidden = 96, tokens = 600;
  std::vector<std::int32_t> ids(static_cast<std::size_t>(tokens));
  for (std::size_t t = 0; t < ids.size(); ++t) ids[t] = static_cast<std::int32_t>(test::splitmix64(t) % vocab);
  const Tensor dout = test::tensor_of<float>(test::normalish(tokens * hidden, 31, 1.0), {tokens, hidden});
  const auto run = [&](unsigned threads) {
    Tensor dtable(DType::F32, Shape{vocab, hidden});
    embedding_backward(ids, dout.view(), dtable.view(), threads);
    embedding_backward(ids, dout.view(), dtable.view(), threads);  // a second micro-batch adds on
    return dtable;
  };
  const Tensor one = run(1);
  for (const unsigned threads : {2u, 5u, 8u}) require_identical(one.view(), run(threads).view(), "dtable");

  // The second pass added onto the first (+=): each row holds twice one pass's sums, up to the
  // rounding of sums of ~12 terms of size ~1 (1e-4 is ~100x that, far below a missing pass).
  Tensor single(DType::F32, Shape{vocab, hidden});
  embedding_backward(ids, dout.view(), single.view(), 1);
  const auto twice = one.span<const float>();
  const auto once = single.span<const float>();
  for (std::size_t i = 0; i < once.size(); ++i) REQUIRE(twice[i] == Approx(2.0 * once[i]).margin(1e-4));

  Tensor out(DType::F32, Shape{tokens, hidden});
  const Tensor table = test::tensor_of<float>(test::normalish(vocab * hidden, 32, 1.0), {vocab, hidden});
  embedding_forward(table.view(), ids, out.view(), 4);
  const auto rows = table.span<const float>();
  const auto got = out.span<const float>();
  for (std::size_t t = 0; t < ids.size(); ++t) {
    REQUIRE(std::equal(got.begin() + static_cast<std::ptrdiff_t>(t * hidden), got.begin() + static_cast<std::ptrdiff_t>((t + 1) * hidden),
                       rows.begin() + static_cast<std::ptrdiff_t>(ids[t] * hidden)));
  }
}

TEST_CASE("embedding refuses out-of-range ids and bad tensors", "[nn][embedding][errors]") {
  const Tensor table(DType::F32, Shape{11, 4});
  Tensor out(DType::F32, Shape{3, 4});
  const std::vector<std::int32_t> too_big{1, 11, 2}, negative{0, 1, -1};
  require_error([&] { embedding_forward(table.view(), too_big, out.view(), 1); }, "TokenOutOfRange", "ids[1] is 11",
                "11 rows");
  require_error([&] { embedding_forward(table.view(), negative, out.view(), 1); }, "TokenOutOfRange", "ids[2] is -1");
  // Nothing was written before the bad id was found.
  for (const float v : out.span<const float>()) REQUIRE(v == 0.0f);

  const std::vector<std::int32_t> ids{1, 2, 3};
  require_error([&] { embedding_forward(table.view(), ids, Tensor(DType::F32, Shape{3, 5}).view(), 1); },
                "ShapeMismatch", "embedding: out is [3, 5], expected [3, 4]");
  require_error([&] { embedding_forward(table.view(), ids, Tensor(DType::F32, Shape{2, 4}).view(), 1); },
                "ShapeMismatch", "out is [2, 4], expected [3, 4]");
  require_error([&] { embedding_forward(Tensor(DType::F32, Shape{44}).view(), ids, out.view(), 1); }, "ShapeMismatch",
                "table is [44], expected [vocab, hidden]");
  require_error([&] { embedding_forward(Tensor(DType::BF16, Shape{11, 4}).view(), ids, out.view(), 1); },
                "DTypeMismatch", "table is BF16");

  Tensor dtable(DType::F32, Shape{11, 4});
  const Tensor dout(DType::F32, Shape{3, 4});
  require_error([&] { embedding_backward(too_big, dout.view(), dtable.view(), 1); }, "TokenOutOfRange",
                "embedding_backward: ids[1] is 11");
  require_error([&] { embedding_backward(ids, Tensor(DType::F32, Shape{3, 5}).view(), dtable.view(), 1); },
                "ShapeMismatch", "dout is [3, 5], expected [3, 4]");
  require_error([&] { embedding_backward(ids, dout.view(), dtable.view(), EmbeddingPadding{11}, 1); },
                "InvalidArgument", "padding id 11");
}
