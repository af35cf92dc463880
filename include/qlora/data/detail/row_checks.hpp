// The check a collator (pad_collator.hpp, varlen_batch.hpp) makes on each row of
// a batch before copying it, for both kinds of row: a sample (one label per
// token, at least one token) or a packed row (PackedSequence::validate). Errors
// name the row by its index in the batch.
#pragma once

#include <cstddef>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/detail/sample_checks.hpp>
#include <qlora/data/encoded_sample.hpp>
#include <qlora/data/packed_sequence.hpp>

namespace qlora::detail {

inline void check_row(const EncodedSample& sample, std::size_t index) { check_sample(sample, index); }

inline void check_row(const PackedSequence& row, std::size_t index) {
  try {
    row.validate();
  } catch (const Error& e) {
    throw e.with_context(fmt::format("packed row {}", index));
  }
}

}  // namespace qlora::detail
