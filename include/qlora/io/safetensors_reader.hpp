// SafetensorsReader: opens a safetensors file (memory-mapped, zero-copy) or
// parses a byte buffer, enforcing every check of the reference reader
// (huggingface/safetensors `SafeTensors::read_metadata`) in the reference's
// order with its error names, and rejecting duplicate keys, which it misses.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/io/detail/safetensors_format.hpp>
#include <qlora/io/detail/safetensors_header.hpp>
#include <qlora/io/detail/utf8.hpp>
#include <qlora/io/mapped_file.hpp>
#include <qlora/io/safetensors_tensor.hpp>

namespace qlora {

namespace detail {

/// A hint for a file that is plainly not safetensors, to append to HeaderTooLarge
/// (these files' first 8 bytes read as an enormous header length).
inline std::string_view foreign_file_hint(std::span<const std::byte> bytes) {
  struct Known {
    std::string_view prefix;
    std::string_view hint;
  };
  static constexpr Known known[] = {
      {"version https://git-lfs",
       "; this is a Git LFS pointer file, not the tensor data: fetch the data with `git lfs pull`"},
      {"PK\x03\x04", "; this is a zip archive (a PyTorch .bin/.pt checkpoint?), not a safetensors file"},
      {"<!DOCTYPE", "; this is an HTML page (a failed download?), not a safetensors file"},
      {"<html", "; this is an HTML page (a failed download?), not a safetensors file"},
      {"{", "; this is a JSON file (model.safetensors.index.json?), not a safetensors file"},
  };
  const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
  for (const Known& k : known) {
    if (text.starts_with(k.prefix)) return k.hint;
  }
  return {};
}

/// Indices 0..count-1 ordered by `name_of(i)`, byte-wise.
template <class NameOf>
std::vector<std::size_t> sorted_by_name(std::size_t count, NameOf name_of) {
  std::vector<std::size_t> order(count);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(),
            [&](std::size_t a, std::size_t b) { return std::string_view(name_of(a)) < std::string_view(name_of(b)); });
  return order;
}

/// Throws Error("DuplicateKey") when two of the names (in `order`, sorted) are equal.
template <class NameOf>
void check_unique(const std::vector<std::size_t>& order, NameOf name_of, std::string_view what) {
  const auto repeated = std::adjacent_find(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return std::string_view(name_of(a)) == std::string_view(name_of(b));
  });
  check(repeated == order.end(), "DuplicateKey", "{} `{}` appears more than once in the header", what,
        repeated == order.end() ? std::string_view() : std::string_view(name_of(*repeated)));
}

}  // namespace detail

/// A parsed safetensors file: its tensors (views of the file's bytes) and its
/// `__metadata__`.
///
///     auto file = SafetensorsReader::open("model.safetensors");
///     for (const SafetensorsTensor& t : file.tensors()) fmt::print("{} {}\n", t.name, dtype_name(t.dtype));
///     std::vector<float> bias = file.read<float>("model.norm.bias");
///
/// Every malformed input throws qlora::Error, never anything else, and its code
/// is the reference's `SafeTensorError` variant, checked in the reference order:
/// HeaderTooSmall, HeaderTooLarge, InvalidHeaderLength, InvalidHeader (UTF-8),
/// InvalidHeaderDeserialization (JSON and schema), then DuplicateKey (ours),
/// then per tensor in data order InvalidOffset, ValidationOverflow,
/// MisalignedSlice, TensorInvalidInfo, and last MetadataIncompleteBuffer.
class SafetensorsReader {
 public:
  /// Parses a whole file held in memory. The bytes are not copied: they must
  /// outlive the reader and every view it hands out.
  [[nodiscard]] static SafetensorsReader parse(std::span<const std::byte> file_bytes) {
    SafetensorsReader reader;
    reader.index(file_bytes);
    return reader;
  }

  /// Maps `path` read-only and parses it; errors name the file.
  [[nodiscard]] static SafetensorsReader open(const std::filesystem::path& path) {
    SafetensorsReader reader;
    reader.source_ = path.string();
    reader.file_ = MappedFile(path);
    reader.with_source([&] { reader.index(reader.file_.bytes()); });
    return reader;
  }

  /// The tensors in the order of their data in the file.
  [[nodiscard]] std::span<const SafetensorsTensor> tensors() const noexcept { return tensors_; }
  /// The `__metadata__` map in file order; nullopt when the header has none (or null).
  [[nodiscard]] const std::optional<SafetensorsMetadata>& metadata() const noexcept { return metadata_; }
  /// The metadata value for `key`, if present.
  [[nodiscard]] std::optional<std::string_view> metadata_value(std::string_view key) const noexcept {
    if (!metadata_) return std::nullopt;
    for (const auto& [k, v] : *metadata_) {
      if (k == key) return v;
    }
    return std::nullopt;
  }

  /// The tensor called `name`, or nullptr.
  [[nodiscard]] const SafetensorsTensor* find(std::string_view name) const noexcept {
    const auto it = std::lower_bound(by_name_.begin(), by_name_.end(), name,
                                     [&](std::size_t i, std::string_view n) { return tensors_[i].name < n; });
    return it != by_name_.end() && tensors_[*it].name == name ? &tensors_[*it] : nullptr;
  }
  /// The tensor called `name`; throws Error("TensorNotFound").
  [[nodiscard]] const SafetensorsTensor& tensor(std::string_view name) const {
    const SafetensorsTensor* found = nullptr;
    with_source([&] { found = &lookup(name); });
    return *found;
  }
  /// A copy of tensor `name` as T (see SafetensorsTensor::read).
  template <class T>
  [[nodiscard]] std::vector<T> read(std::string_view name) const {
    std::vector<T> values;
    with_source([&] { values = lookup(name).template read<T>(); });
    return values;
  }
  /// Tensor `name` in place as T (see SafetensorsTensor::view).
  template <class T>
  [[nodiscard]] std::span<const T> view(std::string_view name) const {
    std::span<const T> values;
    with_source([&] { values = lookup(name).template view<T>(); });
    return values;
  }

  /// The header length N (the JSON text and its padding, without the 8-byte prefix).
  [[nodiscard]] std::uint64_t header_size() const noexcept { return header_size_; }
  /// The path the reader was opened from; empty for parse().
  [[nodiscard]] const std::string& source() const noexcept { return source_; }

 private:
  SafetensorsReader() = default;

  /// Runs `body`, adding the file name (if any) to an Error it throws.
  template <class Body>
  void with_source(Body&& body) const {
    try {
      body();
    } catch (const Error& e) {
      if (source_.empty()) throw;
      throw e.with_context(source_);
    }
  }

  const SafetensorsTensor& lookup(std::string_view name) const {
    const SafetensorsTensor* found = find(name);
    check(found != nullptr, "TensorNotFound", "no tensor `{}` in the file", name);
    return *found;
  }

  void index(std::span<const std::byte> bytes);

  MappedFile file_;
  std::string source_;
  std::vector<SafetensorsTensor> tensors_;  // data order
  std::vector<std::size_t> by_name_;        // indices into tensors_, sorted by name
  std::optional<SafetensorsMetadata> metadata_;
  std::uint64_t header_size_ = 0;
};

inline void SafetensorsReader::index(std::span<const std::byte> bytes) {
  using namespace detail;
  // 1-4: the length prefix and the header's extent.
  check(bytes.size() >= safetensors_prefix_size, "HeaderTooSmall",
        "{} bytes is too short for a safetensors file (it starts with an 8-byte header length)", bytes.size());
  std::uint64_t n = 0;
  for (std::size_t i = 0; i < safetensors_prefix_size; ++i) n |= std::to_integer<std::uint64_t>(bytes[i]) << (8 * i);
  check(n <= safetensors_max_header_size, "HeaderTooLarge", "header length {} exceeds the limit of {} bytes{}", n,
        safetensors_max_header_size, foreign_file_hint(bytes));
  check(n <= bytes.size() - safetensors_prefix_size, "InvalidHeaderLength",
        "header length {} runs past the end of the {}-byte file", n, bytes.size());
  header_size_ = n;
  const std::string_view header(reinterpret_cast<const char*>(bytes.data()) + safetensors_prefix_size, n);

  // 5-6: UTF-8, then JSON.
  const std::size_t valid = utf8_valid_prefix(header);
  check(valid == header.size(), "InvalidHeader", "invalid UTF-8 in header at byte {} of {}", valid, header.size());
  // nlohmann skips a leading byte order mark and stops at a NUL byte as if the
  // input ended there; serde_json rejects both (no JSON text holds a raw NUL).
  check(!header.starts_with("\xEF\xBB\xBF"), "InvalidHeaderDeserialization",
        "invalid JSON in header: it starts with a UTF-8 byte order mark, expected `{{`");
  const std::size_t nul = header.find('\0');
  check(nul == header.npos, "InvalidHeaderDeserialization", "invalid JSON in header: a NUL byte at byte {}", nul);
  ParsedHeader parsed = parse_safetensors_header(header);
  std::vector<HeaderEntry>& entries = parsed.entries;

  // Ours: the reference keeps the last of repeated keys (safetensors issue #401).
  const auto entry_name = [&](std::size_t i) -> const std::string& { return entries[i].tensor.name; };
  std::vector<std::size_t> name_order = sorted_by_name(entries.size(), entry_name);
  check_unique(name_order, entry_name, "tensor");
  if (parsed.metadata) {
    const auto key = [&](std::size_t i) -> const std::string& { return (*parsed.metadata)[i].first; };
    check_unique(sorted_by_name(parsed.metadata->size(), key), key, "metadata key");
  }

  // 7-10: walk the tensors in data order; they must tile the data section.
  std::vector<std::size_t> data_order(entries.size());
  std::iota(data_order.begin(), data_order.end(), std::size_t{0});
  std::stable_sort(data_order.begin(), data_order.end(), [&](std::size_t a, std::size_t b) {
    return std::pair(entries[a].begin, entries[a].end) < std::pair(entries[b].begin, entries[b].end);
  });
  std::uint64_t end = 0;
  for (const std::size_t i : data_order) {
    const HeaderEntry& e = entries[i];
    const SafetensorsTensor& t = e.tensor;
    check(e.begin == end && e.end >= e.begin, "InvalidOffset",
          "tensor `{}`: data_offsets [{}, {}], expected a range starting at {} (tensor data must be contiguous, "
          "without gaps or overlaps)",
          t.name, e.begin, e.end, end);
    end = e.end;
    const std::uint64_t size = tensor_byte_size(t.dtype, t.shape, t.name);
    check(e.end - e.begin == size, "TensorInvalidInfo",
          "tensor `{}`: a {} tensor of shape {} has {} bytes, but data_offsets [{}, {}] span {}", t.name,
          dtype_name(t.dtype), shape_string(t.shape), size, e.begin, e.end, e.end - e.begin);
    // Ours: shapes are int64 (as torch's); only a zero-size tensor gets this far with a larger dimension.
    check(std::none_of(t.shape.begin(), t.shape.end(), [](std::int64_t d) { return d < 0; }), "ValidationOverflow",
          "tensor `{}`: a dimension of shape {} exceeds the int64 range", t.name, shape_string(t.shape));
  }

  // 11: the data section holds exactly the tensors (no polyglot tail, no truncation).
  const std::uint64_t data_size = bytes.size() - safetensors_prefix_size - n;
  check(end == data_size, "MetadataIncompleteBuffer",
        "incomplete metadata: the tensors cover {} bytes of data but the file holds {} after the header ({})", end,
        data_size, end < data_size ? "trailing bytes" : "truncated file");

  const std::span<const std::byte> data = bytes.subspan(safetensors_prefix_size + n);
  std::vector<std::size_t> position(entries.size());
  tensors_.reserve(entries.size());
  for (const std::size_t i : data_order) {
    position[i] = tensors_.size();
    HeaderEntry& e = entries[i];
    e.tensor.data = data.subspan(e.begin, e.end - e.begin);
    tensors_.push_back(std::move(e.tensor));
  }
  for (std::size_t& i : name_order) i = position[i];
  by_name_ = std::move(name_order);
  metadata_ = std::move(parsed.metadata);
}

}  // namespace qlora
