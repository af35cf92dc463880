// IWYU pragma: private
// The safetensors header schema, parsed in one SAX pass straight into tensor
// entries: what serde_json accepts for the reference's `HashMetadata` and what
// it rejects (every rejection is InvalidHeaderDeserialization), without a DOM
// and without losing repeated keys, which nlohmann's DOM would hide.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/safetensors_tensor.hpp>

namespace qlora::detail {

/// A tensor entry of the header, before its offsets are validated.
struct HeaderEntry {
  SafetensorsTensor tensor;  // `data` is still empty
  std::uint64_t begin = 0;   // data_offsets, relative to the data section
  std::uint64_t end = 0;
};

/// A parsed header: tensor entries in file order (repeated names kept) and the
/// `__metadata__` map (nullopt when absent or null, as the reference's Option).
struct ParsedHeader {
  std::vector<HeaderEntry> entries;
  std::optional<SafetensorsMetadata> metadata;
};

/// SAX handler for nlohmann::json::sax_parse. It mirrors serde's derived
/// deserializers for the reference types, including their lenient corners:
/// a tensor may be an object {"dtype","shape","data_offsets"} in any order with
/// unknown fields ignored, or a sequence [dtype, shape, data_offsets]; a dtype
/// may be "F32" or {"F32": null}; shape and offsets must be JSON integers
/// without a sign (so "-0" and "1.0" fail); nesting deeper than 127 levels fails
/// (serde_json's recursion limit of 128).
class SafetensorsHeaderSax {
 public:
  using number_integer_t = Json::number_integer_t;
  using number_unsigned_t = Json::number_unsigned_t;
  using number_float_t = Json::number_float_t;
  using string_t = Json::string_t;
  using binary_t = Json::binary_t;

  bool null() { return scalar(Value::null); }
  bool boolean(bool) { return scalar(Value::boolean); }
  bool number_integer(number_integer_t) { return scalar(Value::signed_integer); }
  bool number_float(number_float_t, const string_t&) { return scalar(Value::floating); }
  bool binary(binary_t&) { return scalar(Value::binary); }
  bool number_unsigned(number_unsigned_t value);
  bool string(string_t& value);
  bool start_object(std::size_t) { return open(Value::object); }
  bool start_array(std::size_t) { return open(Value::array); }
  bool key(string_t& key);
  bool end_object();
  bool end_array();
  bool parse_error(std::size_t, const std::string&, const Json::exception& error) {
    error_ = error.what();
    return false;
  }

  /// The message of the first error (empty when the parse succeeded).
  [[nodiscard]] const std::string& error() const noexcept { return error_; }
  [[nodiscard]] ParsedHeader take() { return std::move(header_); }

 private:
  // serde_json's `remaining_depth` starts at 128 and fails when it reaches 0.
  static constexpr std::size_t max_depth = 127;

  enum class Value { null, boolean, signed_integer, unsigned_integer, floating, string, binary, object, array };
  // What the next value must be.
  enum class Slot {
    header,
    metadata,
    metadata_value,
    tensor,
    dtype,
    dtype_unit,
    shape,
    dim,
    offsets,
    offset,
    ignored,
    too_many,
    key_or_end,
  };
  // The container being filled.
  enum class Frame {
    top,
    metadata,
    tensor_object,
    tensor_array,
    dtype_map,
    shape,
    offsets,
    ignored_object,
    ignored_array
  };
  struct Open {
    Frame frame;
    unsigned count = 0;   // elements (arrays) or recognised fields (objects) seen
    unsigned fields = 0;  // tensor_object: bit set of dtype (1), shape (2), data_offsets (4)
  };

  bool scalar(Value value);
  bool open(Value value);
  bool value_done();
  bool fail(std::string_view what);
  [[nodiscard]] HeaderEntry& entry() { return header_.entries.back(); }
  static std::string_view describe(Value value);
  static std::string_view expectation(Slot slot);
  bool set_dtype(std::string_view name);

  ParsedHeader header_;
  std::vector<Open> stack_;
  Slot slot_ = Slot::header;
  bool metadata_seen_ = false;
  std::string error_;
};

inline std::string_view SafetensorsHeaderSax::describe(Value value) {
  switch (value) {
    case Value::null:
      return "null";
    case Value::boolean:
      return "a boolean";
    case Value::signed_integer:
      return "a negative integer";
    case Value::unsigned_integer:
      return "an integer";
    case Value::floating:
      return "a floating-point number";
    case Value::string:
      return "a string";
    case Value::binary:
      return "binary data";
    case Value::object:
      return "an object";
    case Value::array:
      return "an array";
  }
  return "a value";
}

inline std::string_view SafetensorsHeaderSax::expectation(Slot slot) {
  switch (slot) {
    case Slot::header:
      return "the header must be a JSON object";
    case Slot::metadata:
      return "`__metadata__` must be an object of strings";
    case Slot::metadata_value:
      return "`__metadata__` values must be strings";
    case Slot::tensor:
      return "expected an object with dtype, shape and data_offsets";
    case Slot::dtype:
      return "dtype must be a string such as \"F32\"";
    case Slot::dtype_unit:
      return "a dtype written as {\"NAME\": ...} needs null as the value";
    case Slot::shape:
      return "shape must be an array of integers";
    case Slot::dim:
      return "shape must hold integers >= 0";
    case Slot::offsets:
      return "data_offsets must be an array [begin, end]";
    case Slot::offset:
      return "data_offsets must hold integers >= 0";
    case Slot::too_many:
      return "too many elements (a tensor is [dtype, shape, data_offsets], offsets are [begin, end])";
    case Slot::ignored:
    case Slot::key_or_end:
      break;
  }
  return "unexpected value";
}

inline bool SafetensorsHeaderSax::fail(std::string_view what) {
  const bool in_tensor =
      slot_ == Slot::tensor ||
      (stack_.size() >= 2 && (stack_[1].frame == Frame::tensor_object || stack_[1].frame == Frame::tensor_array));
  error_ = in_tensor ? fmt::format("tensor `{}`: {}", entry().tensor.name, what) : std::string(what);
  return false;
}

inline bool SafetensorsHeaderSax::set_dtype(std::string_view name) {
  const std::optional<DType> dtype = dtype_from_name(name);
  if (!dtype) return fail(fmt::format("unknown dtype \"{}\"", name));
  entry().tensor.dtype = *dtype;
  return true;
}

inline bool SafetensorsHeaderSax::scalar(Value value) {
  // Beyond the unsigned integers and strings handled by their own callbacks, the
  // schema takes null for "__metadata__" (no metadata) and for {"NAME": null}, and
  // anything as the value of an unknown field.
  const bool null_allowed = slot_ == Slot::metadata || slot_ == Slot::dtype_unit;
  if (slot_ == Slot::ignored || (value == Value::null && null_allowed)) return value_done();
  return fail(fmt::format("{}, not {}", expectation(slot_), describe(value)));
}

inline bool SafetensorsHeaderSax::number_unsigned(number_unsigned_t value) {
  if (slot_ == Slot::dim) {
    // Values above INT64_MAX wrap to negative here; validation rejects them.
    entry().tensor.shape.push_back(static_cast<std::int64_t>(value));
    return value_done();
  }
  if (slot_ == Slot::offset) {
    (stack_.back().count == 0 ? entry().begin : entry().end) = value;
    return value_done();
  }
  return scalar(Value::unsigned_integer);
}

inline bool SafetensorsHeaderSax::string(string_t& value) {
  if (slot_ == Slot::metadata_value) {
    header_.metadata->back().second = std::move(value);
    return value_done();
  }
  if (slot_ == Slot::dtype) return set_dtype(value) && value_done();
  return scalar(Value::string);
}

inline bool SafetensorsHeaderSax::open(Value value) {
  if (stack_.size() >= max_depth) return fail("nesting deeper than 127 levels");
  const bool object = value == Value::object;
  Frame frame;
  switch (slot_) {
    case Slot::header:
      if (!object) return scalar(value);
      frame = Frame::top;
      break;
    case Slot::metadata:
      if (!object) return scalar(value);
      header_.metadata.emplace();
      frame = Frame::metadata;
      break;
    case Slot::tensor:
      frame = object ? Frame::tensor_object : Frame::tensor_array;
      break;
    case Slot::dtype:
      if (!object) return scalar(value);
      frame = Frame::dtype_map;
      break;
    case Slot::shape:
      if (object) return scalar(value);
      frame = Frame::shape;
      break;
    case Slot::offsets:
      if (object) return scalar(value);
      frame = Frame::offsets;
      break;
    case Slot::ignored:
      frame = object ? Frame::ignored_object : Frame::ignored_array;
      break;
    default:
      return scalar(value);
  }
  stack_.push_back({frame});
  switch (frame) {
    case Frame::tensor_array:
      slot_ = Slot::dtype;
      break;
    case Frame::shape:
      slot_ = Slot::dim;
      break;
    case Frame::offsets:
      slot_ = Slot::offset;
      break;
    case Frame::ignored_array:
      slot_ = Slot::ignored;
      break;
    default:
      slot_ = Slot::key_or_end;
      break;
  }
  return true;
}

inline bool SafetensorsHeaderSax::key(string_t& key) {
  Open& top = stack_.back();
  switch (top.frame) {
    case Frame::top:
      if (key == "__metadata__") {
        if (metadata_seen_) return fail("duplicate field `__metadata__`");
        metadata_seen_ = true;
        slot_ = Slot::metadata;
      } else {
        header_.entries.emplace_back();
        entry().tensor.name = std::move(key);
        slot_ = Slot::tensor;
      }
      return true;
    case Frame::metadata:
      header_.metadata->emplace_back(std::move(key), std::string());
      slot_ = Slot::metadata_value;
      return true;
    case Frame::tensor_object: {
      static constexpr std::string_view fields[] = {"dtype", "shape", "data_offsets"};
      static constexpr Slot slots[] = {Slot::dtype, Slot::shape, Slot::offsets};
      slot_ = Slot::ignored;  // unknown fields are skipped, as serde does without deny_unknown_fields
      for (unsigned i = 0; i < 3; ++i) {
        if (key != fields[i]) continue;
        if (top.fields & (1u << i)) return fail(fmt::format("duplicate field `{}`", fields[i]));
        top.fields |= 1u << i;
        slot_ = slots[i];
      }
      return true;
    }
    case Frame::dtype_map:
      if (top.count++ != 0) return fail("a dtype written as a map must have a single key");
      slot_ = Slot::dtype_unit;
      return set_dtype(key);
    default:  // ignored_object
      slot_ = Slot::ignored;
      return true;
  }
}

inline bool SafetensorsHeaderSax::end_object() {
  const Open top = stack_.back();
  if (top.frame == Frame::tensor_object && top.fields != 7u) {
    const std::string_view missing = (top.fields & 1u) == 0   ? "dtype"
                                     : (top.fields & 2u) == 0 ? "shape"
                                                              : "data_offsets";
    return fail(fmt::format("missing field `{}`", missing));
  }
  if (top.frame == Frame::dtype_map && top.count == 0) return fail("a dtype written as a map must have a single key");
  stack_.pop_back();
  return value_done();
}

inline bool SafetensorsHeaderSax::end_array() {
  const Open top = stack_.back();
  if (top.frame == Frame::tensor_array && top.count != 3) {
    return fail(
        fmt::format("a tensor written as a sequence needs 3 elements [dtype, shape, data_offsets], not {}", top.count));
  }
  if (top.frame == Frame::offsets && top.count != 2) {
    return fail(fmt::format("data_offsets needs 2 elements [begin, end], not {}", top.count));
  }
  stack_.pop_back();
  return value_done();
}

inline bool SafetensorsHeaderSax::value_done() {
  if (stack_.empty()) {
    slot_ = Slot::key_or_end;  // the top-level object is complete; only whitespace may follow
    return true;
  }
  Open& top = stack_.back();
  switch (top.frame) {
    case Frame::tensor_array:
      ++top.count;
      slot_ = top.count == 1 ? Slot::shape : top.count == 2 ? Slot::offsets : Slot::too_many;
      break;
    case Frame::shape:
      slot_ = Slot::dim;
      break;
    case Frame::offsets:
      ++top.count;
      slot_ = top.count < 2 ? Slot::offset : Slot::too_many;
      break;
    case Frame::ignored_array:
      slot_ = Slot::ignored;
      break;
    default:
      slot_ = Slot::key_or_end;
      break;
  }
  return true;
}

/// Parses the header JSON (already checked to be UTF-8). Throws
/// Error("InvalidHeaderDeserialization") naming what was expected.
inline ParsedHeader parse_safetensors_header(std::string_view json) {
  SafetensorsHeaderSax sax;
  const bool parsed = Json::sax_parse(json.begin(), json.end(), &sax);
  check(parsed, "InvalidHeaderDeserialization", "invalid JSON in header: {}", sax.error());
  return sax.take();
}

}  // namespace qlora::detail
