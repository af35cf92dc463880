// SafetensorsWriter: collects tensors and metadata and writes a safetensors file
// byte-identical to the one Python's safetensors (0.8.0) `save_file` writes for
// the same tensors and metadata, atomically.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <optional>
#include <ranges>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/io/atomic_file.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/detail/safetensors_format.hpp>
#include <qlora/io/detail/utf8.hpp>
#include <qlora/io/safetensors_tensor.hpp>

namespace qlora {

/// Builds a safetensors file. It stores views of the tensors' bytes, not copies:
/// the data must outlive serialize() / write().
///
///     SafetensorsWriter writer;                      // __metadata__ = {"format": "pt"}
///     writer.add("w", {2, 3}, weights);              // a std::vector<float> of 6
///     writer.add("b", DType::BF16, {3}, std::as_bytes(std::span(bias)));
///     writer.write("adapter_model.safetensors");
///
/// The layout is the reference writer's (safetensors/src/tensor.rs `prepare`):
/// tensors sorted by dtype, widest alignment first (DType order, descending),
/// then by name byte-wise; data offsets assigned in that order; the header is
/// compact JSON (`__metadata__` first, then the tensors in that order, each
/// {"dtype","shape","data_offsets"}) padded with spaces to a multiple of 8 bytes.
/// Metadata keys are written in the order given (the reference writes a hash
/// map, so its order is arbitrary when there is more than one key).
class SafetensorsWriter {
 public:
  /// Adds a tensor of `dtype` and `shape` whose bytes are `data`. Throws
  /// Error("InvalidTensorName") for a name that is not UTF-8 or is
  /// "__metadata__", Error("DuplicateKey") for a name added before,
  /// Error("InvalidTensorView") for a negative dimension or a byte count that
  /// does not match, and ValidationOverflow / MisalignedSlice as the reader would.
  SafetensorsWriter& add(std::string name, DType dtype, std::vector<std::int64_t> shape,
                         std::span<const std::byte> data) {
    check(detail::is_valid_utf8(name), "InvalidTensorName", "tensor name `{}` is not valid UTF-8", name);
    check(name != "__metadata__", "InvalidTensorName", "a tensor cannot be called `__metadata__`");
    check(!names_.contains(name), "DuplicateKey", "tensor `{}` was added twice", name);
    const auto negative = std::ranges::find_if(shape, [](std::int64_t d) { return d < 0; });
    check(negative == shape.end(), "InvalidTensorView", "tensor `{}`: dimension {} is negative ({})", name,
          negative - shape.begin(), negative == shape.end() ? 0 : *negative);
    const std::uint64_t size = detail::tensor_byte_size(dtype, shape, name);
    check(size == data.size(), "InvalidTensorView", "tensor `{}`: a {} tensor of shape {} has {} bytes, not {}", name,
          dtype_name(dtype), detail::shape_string(shape), size, data.size());
    names_.insert(name);
    tensors_.push_back({std::move(name), dtype, std::move(shape), data});
    return *this;
  }

  /// Adds a tensor whose elements are `values` (a contiguous range of float,
  /// bf16, fp16, int32_t, ...: the dtype follows the element type).
  template <std::ranges::contiguous_range Values>
  SafetensorsWriter& add(std::string name, std::vector<std::int64_t> shape, Values&& values) {
    static_assert(std::is_lvalue_reference_v<Values> || std::ranges::borrowed_range<Values>,
                  "the writer keeps a view of the values: pass a variable, not a temporary");
    using T = std::ranges::range_value_t<Values>;
    static_assert(std::endian::native == std::endian::little, "safetensors data is little-endian");
    const std::span<const T> elements(std::ranges::data(values), std::ranges::size(values));
    return add(std::move(name), dtype_of_v<T>, std::move(shape), std::as_bytes(elements));
  }

  /// Adds `tensor` (as read from another file, for example).
  SafetensorsWriter& add(const SafetensorsTensor& tensor) {
    return add(tensor.name, tensor.dtype, tensor.shape, tensor.data);
  }

  /// Replaces the `__metadata__` map (keys written in this order); nullopt writes
  /// no `__metadata__` at all. The default is {"format": "pt"}, which
  /// transformers requires of any file that has metadata. Throws
  /// Error("InvalidMetadata") for text that is not UTF-8 and Error("DuplicateKey").
  void set_metadata(std::optional<SafetensorsMetadata> metadata) {
    if (metadata) {
      std::set<std::string_view> keys;
      for (const auto& [key, value] : *metadata) {
        check(detail::is_valid_utf8(key) && detail::is_valid_utf8(value), "InvalidMetadata",
              "metadata entry `{}` is not valid UTF-8", key);
        check(keys.insert(key).second, "DuplicateKey", "metadata key `{}` is given twice", key);
      }
    }
    metadata_ = std::move(metadata);
  }

  /// The tensors in the order they were added.
  [[nodiscard]] std::span<const SafetensorsTensor> tensors() const noexcept { return tensors_; }
  /// The `__metadata__` map to write.
  [[nodiscard]] const std::optional<SafetensorsMetadata>& metadata() const noexcept { return metadata_; }

  /// The whole file in memory.
  [[nodiscard]] std::vector<std::byte> serialize() const {
    const Layout layout = lay_out();
    // Sized up front and filled by memcpy (vector::insert of span iterators
    // trips a false -Wstringop-overflow in GCC 12 at -O3).
    std::vector<std::byte> file(layout.file_size);
    std::size_t written = 0;
    emit(layout, [&](std::span<const std::byte> bytes) {
      if (bytes.empty()) return;
      std::memcpy(file.data() + written, bytes.data(), bytes.size());
      written += bytes.size();
    });
    return file;
  }

  /// Writes the file to `path` atomically (see write_file_atomically).
  void write(const std::filesystem::path& path) const {
    write_file_atomically(path, [&](AtomicFile& file) { write_to(file); });
  }

  /// Writes the file into an open AtomicFile, which the caller commits: for
  /// files that must be staged together before any of them is replaced.
  void write_to(AtomicFile& file) const {
    emit(lay_out(), [&](std::span<const std::byte> bytes) { file.write(bytes); });
  }

 private:
  struct Layout {
    std::string header;                           // padded JSON
    std::vector<const SafetensorsTensor*> order;  // data order
    std::size_t file_size = 0;
  };

  Layout lay_out() const {
    // Escapes only lengthen the text: refuse before building a string over the limit.
    std::uint64_t raw_text = 0;
    if (metadata_) {
      for (const auto& [key, value] : *metadata_) raw_text += key.size() + value.size();
    }
    for (const SafetensorsTensor& t : tensors_) raw_text += t.name.size();
    check_header_size(raw_text);

    Layout layout;
    for (const SafetensorsTensor& t : tensors_) layout.order.push_back(&t);
    std::ranges::sort(layout.order, [](const SafetensorsTensor* a, const SafetensorsTensor* b) {
      if (a->dtype != b->dtype) return a->dtype > b->dtype;
      return std::string_view(a->name) < std::string_view(b->name);
    });
    std::string& json = layout.header;
    json += '{';
    if (metadata_) {
      json += "\"__metadata__\":{";
      for (const auto& [key, value] : *metadata_) {
        if (json.back() != '{') json += ',';
        detail::append_json_string(json, key, detail::JsonEscape::minimal);
        json += ':';
        detail::append_json_string(json, value, detail::JsonEscape::minimal);
      }
      json += '}';
    }
    std::uint64_t offset = 0;
    for (const SafetensorsTensor* t : layout.order) {
      if (json.back() != '{') json += ',';
      detail::append_json_string(json, t->name, detail::JsonEscape::minimal);
      json += fmt::format(":{{\"dtype\":\"{}\",\"shape\":[", dtype_name(t->dtype));
      for (std::size_t i = 0; i < t->shape.size(); ++i) json += fmt::format("{}{}", i == 0 ? "" : ",", t->shape[i]);
      json += fmt::format("],\"data_offsets\":[{},{}]}}", offset, offset + t->data.size());
      offset += t->data.size();
    }
    json += '}';
    json.resize((json.size() + 7) / 8 * 8, ' ');  // data starts 8-byte aligned
    check_header_size(json.size());
    layout.file_size = detail::safetensors_prefix_size + json.size() + offset;
    return layout;
  }

  static void check_header_size(std::uint64_t size) {
    check(size <= detail::safetensors_max_header_size, "HeaderTooLarge",
          "the header would be over {} bytes, the limit of the format", detail::safetensors_max_header_size);
  }

  template <class Sink>
  static void emit(const Layout& layout, Sink&& sink) {
    std::byte prefix[detail::safetensors_prefix_size];
    const std::uint64_t n = layout.header.size();
    for (std::size_t i = 0; i < detail::safetensors_prefix_size; ++i) prefix[i] = static_cast<std::byte>(n >> (8 * i));
    sink(std::span<const std::byte>(prefix));
    sink(std::as_bytes(std::span(layout.header.data(), layout.header.size())));
    for (const SafetensorsTensor* t : layout.order) sink(t->data);
  }

  std::vector<SafetensorsTensor> tensors_;
  std::set<std::string, std::less<>> names_;
  std::optional<SafetensorsMetadata> metadata_{SafetensorsMetadata{{"format", "pt"}}};
};

}  // namespace qlora
