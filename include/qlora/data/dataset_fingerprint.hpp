// A short fingerprint of a tokenized dataset, for the resume cursor
// (epoch_cursor.hpp): a checkpoint taken on one dataset must not silently resume
// on another (changed data, tokenizer, template or max_length would make
// "skip the first N samples" skip the wrong ones). FNV-1a 64 over a byte
// encoding that is the same on every host (little-endian integers, every
// sequence prefixed by its length so that [1 2][3] and [1][2 3] differ). It
// detects accidents, not adversaries.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include <qlora/data/encoded_sample.hpp>
#include <qlora/data/packed_sequence.hpp>
#include <qlora/data/tokenizer.hpp>

namespace qlora {

class DatasetFingerprint {
 public:
  /// Bytes as they are, without a length prefix: a file streamed in pieces
  /// hashes like the whole file.
  DatasetFingerprint& add_bytes(std::string_view bytes) noexcept {
    for (const char c : bytes) add_byte(static_cast<std::uint8_t>(c));
    return *this;
  }

  /// Free-form context (template name, max_length...), length-prefixed.
  DatasetFingerprint& add(std::string_view text) noexcept {
    add_u64(text.size());
    return add_bytes(text);
  }

  DatasetFingerprint& add(std::span<const std::int32_t> values) noexcept {
    add_u64(values.size());
    for (const std::int32_t value : values) {
      const auto bits = static_cast<std::uint32_t>(value);
      for (int shift = 0; shift < 32; shift += 8) add_byte(static_cast<std::uint8_t>(bits >> shift));
    }
    return *this;
  }

  DatasetFingerprint& add(const EncodedSample& sample) noexcept { return add(sample.input_ids).add(sample.labels); }

  DatasetFingerprint& add(const PackedSequence& sequence) noexcept {
    return add(sequence.input_ids).add(sequence.labels).add(sequence.cu_seqlens);
  }

  /// FNV-1a 64 of everything added so far.
  [[nodiscard]] std::uint64_t value() const noexcept { return hash_; }
  /// "fnv1a64:" and 16 hex digits.
  [[nodiscard]] std::string hex() const { return fmt::format("fnv1a64:{:016x}", hash_); }

 private:
  void add_byte(std::uint8_t byte) noexcept {
    constexpr std::uint64_t fnv_prime = 0x100000001b3ull;
    hash_ = (hash_ ^ byte) * fnv_prime;
  }

  void add_u64(std::uint64_t value) noexcept {
    for (int shift = 0; shift < 64; shift += 8) add_byte(static_cast<std::uint8_t>(value >> shift));
  }

  std::uint64_t hash_ = 0xcbf29ce484222325ull;  // FNV-1a 64 offset basis
};

namespace detail {

template <class Row>
std::string fingerprint_rows(std::span<const Row> rows) {
  DatasetFingerprint fingerprint;
  for (const Row& row : rows) fingerprint.add(row);
  return fingerprint.hex();
}

}  // namespace detail

/// The fingerprint of a dataset (in order): its samples, or its packed rows.
[[nodiscard]] inline std::string dataset_fingerprint(std::span<const EncodedSample> samples) {
  return detail::fingerprint_rows(samples);
}
[[nodiscard]] inline std::string dataset_fingerprint(std::span<const PackedSequence> rows) {
  return detail::fingerprint_rows(rows);
}

}  // namespace qlora
