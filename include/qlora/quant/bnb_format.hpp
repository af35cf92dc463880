// bitsandbytes' checkpoint layout for a 4-bit weight, as transformers saves
// and loads it (bitsandbytes QuantState.as_dict(packed=True) /
// from_dict): next to `<name>` (the packed nibbles, uint8 [(n+1)/2, 1]) sit
//   <name>.absmax            float32 [blocks], or uint8 codes when nested
//   <name>.quant_map         float32 [16]   the code table
//   <name>.nested_absmax     float32 [ceil(blocks/256)]      (nested only)
//   <name>.nested_quant_map  float32 [256]  the dynamic map  (nested only)
//   <name>.quant_state.bitsandbytes__<nf4|fp4>  uint8: UTF-8 JSON with
//     quant_type, blocksize, dtype, shape and, nested, nested_blocksize,
//     nested_dtype, nested_offset.
// Reading accepts any checkpoint bitsandbytes/transformers write (including
// quant_storage other than uint8); writing produces exactly their bytes.
#pragma once

#include <array>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/safetensors_tensor.hpp>
#include <qlora/io/safetensors_writer.hpp>
#include <qlora/quant/quant_policy.hpp>
#include <qlora/quant/quant_state.hpp>

namespace qlora {

/// Anything that looks tensors up by name: SafetensorsReader, ShardedCheckpoint.
template <class S>
concept TensorSource = requires(const S& source, std::string_view name) {
  { source.find(name) } -> std::same_as<const SafetensorsTensor*>;
};

/// The companion tensor names of the 4-bit weight stored as `weight_name`.
struct Bnb4bitKeys {
  std::string weight, absmax, quant_map, nested_absmax, nested_quant_map, quant_state;

  static Bnb4bitKeys of(std::string_view weight_name, QuantType type) {
    const std::string base(weight_name);
    return {base,
            base + ".absmax",
            base + ".quant_map",
            base + ".nested_absmax",
            base + ".nested_quant_map",
            fmt::format("{}.quant_state.bitsandbytes__{}", base, quant_type_name(type))};
  }
};

namespace detail {

/// torch's dtype names, as `str(dtype).strip("torch.")` writes them.
inline std::string_view torch_dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    default: throw Error("BnbFormat", fmt::format("a 4-bit weight cannot have been quantized from {}", dtype_name(dtype)));
  }
}

inline DType dtype_from_torch_name(std::string_view name, std::string_view key) {
  if (name == "float32") return DType::F32;
  if (name == "float16") return DType::F16;
  if (name == "bfloat16") return DType::BF16;
  throw Error("BnbFormat", fmt::format("{}: dtype \"{}\" is not float32, float16 or bfloat16", key, name));
}

/// Python's repr() of a float: {fmt}'s shortest round-trip form (which
/// already switches to exponent notation where Python does: exponents below
/// -4 or from 16) plus the ".0" Python adds to integral values.
inline std::string python_float_repr(double value) {
  std::string text = fmt::format("{}", value);
  if (text.find_first_of(".en") == std::string::npos) text += ".0";
  return text;
}

}  // namespace detail

/// The JSON bitsandbytes packs into `quant_state.bitsandbytes__*`, byte for
/// byte as Python's json.dumps writes it (", " and ": " separators, keys in
/// bitsandbytes' order, the offset as the shortest repr of the float64 that
/// equals the float32 offset).
inline std::string bnb_quant_state_json(const QuantState& state) {
  std::string json = fmt::format(R"({{"quant_type": "{}", "blocksize": {}, "dtype": "{}", "shape": [{}])",
                                 quant_type_name(state.quant_type), state.blocksize,
                                 detail::torch_dtype_name(state.dtype), fmt::join(state.shape, ", "));
  if (state.nested) {
    json += fmt::format(R"(, "nested_blocksize": {}, "nested_dtype": "float32", "nested_offset": {})",
                        nested_blocksize, detail::python_float_repr(state.nested->offset));
  }
  json += "}";
  return json;
}

namespace detail {

/// The fields of a packed quant-state JSON, checked one by one.
inline QuantState parse_bnb_quant_state(std::string_view text, std::string_view key) {
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw Error("BnbFormat", fmt::format("{}: the quant state is not valid JSON: {}", key, e.what()));
  }
  const auto field = [&](const char* name) -> const nlohmann::json& {
    check(json.is_object() && json.contains(name), "BnbFormat", "{}: the quant state has no \"{}\"", key, name);
    return json.at(name);
  };
  const auto integer = [&](const char* name) {
    const auto& value = field(name);
    check(value.is_number_integer(), "BnbFormat", "{}: \"{}\" must be an integer, found {}", key, name, value.dump());
    return value.get<std::int64_t>();
  };
  const auto string = [&](const char* name) {
    const auto& value = field(name);
    check(value.is_string(), "BnbFormat", "{}: \"{}\" must be a string, found {}", key, name, value.dump());
    return value.get<std::string>();
  };
  QuantState state;
  state.quant_type = parse_quant_type(string("quant_type"));
  state.blocksize = integer("blocksize");
  state.dtype = dtype_from_torch_name(string("dtype"), key);
  const auto& shape = field("shape");
  check(shape.is_array() && !shape.empty(), "BnbFormat", "{}: \"shape\" must be a non-empty list", key);
  for (const auto& extent : shape) {
    check(extent.is_number_integer(), "BnbFormat", "{}: shape entries must be integers, found {}", key, extent.dump());
    state.shape.push_back(extent.get<std::int64_t>());
  }
  if (json.contains("nested_offset")) {
    check(integer("nested_blocksize") == nested_blocksize, "BnbFormat", "{}: nested_blocksize must be {}", key,
          nested_blocksize);
    check(string("nested_dtype") == "float32", "BnbFormat", "{}: nested_dtype must be \"float32\"", key);
    const auto& offset = field("nested_offset");
    check(offset.is_number(), "BnbFormat", "{}: nested_offset must be a number", key);
    state.nested = NestedAbsmax{};
    state.nested->offset = static_cast<float>(offset.get<double>());  // exact: it was a float32
  }
  return state;
}

template <class T>
std::vector<T> read_companion(const SafetensorsTensor* tensor, std::string_view name, DType dtype,
                              std::size_t expected_count) {
  check(tensor != nullptr, "BnbFormat", "missing tensor `{}`", name);
  check(tensor->dtype == dtype, "BnbFormat", "tensor `{}` is {}, expected {}", name, dtype_name(tensor->dtype),
        dtype_name(dtype));
  check(static_cast<std::size_t>(tensor->numel()) == expected_count, "BnbFormat",
        "tensor `{}` has {} elements, expected {}", name, tensor->numel(), expected_count);
  return tensor->read<T>();
}

}  // namespace detail

/// The quant type of the 4-bit weight `weight_name` in `source`, or nullopt
/// when it is stored as a plain tensor (no quant-state companion).
template <TensorSource Source>
std::optional<QuantType> bnb_4bit_type(const Source& source, std::string_view weight_name) {
  for (const QuantType type : {QuantType::nf4, QuantType::fp4}) {
    if (source.find(Bnb4bitKeys::of(weight_name, type).quant_state) != nullptr) return type;
  }
  return std::nullopt;
}

/// Reads the 4-bit weight `weight_name` and its quant state; every companion
/// tensor is checked against the JSON (names, dtypes, sizes) before use.
template <TensorSource Source>
Quantized4bit read_bnb_4bit(const Source& source, std::string_view weight_name) {
  const std::optional<QuantType> type = bnb_4bit_type(source, weight_name);
  check(type.has_value(), "BnbFormat", "`{}` has no quant_state.bitsandbytes__nf4/__fp4 companion: not a 4-bit weight",
        weight_name);
  const Bnb4bitKeys keys = Bnb4bitKeys::of(weight_name, *type);
  const SafetensorsTensor& state_tensor = *source.find(keys.quant_state);
  check(state_tensor.dtype == DType::U8, "BnbFormat", "`{}` must be U8 bytes, found {}", keys.quant_state,
        dtype_name(state_tensor.dtype));
  const std::string_view json(reinterpret_cast<const char*>(state_tensor.data.data()), state_tensor.data.size());
  QuantState state = detail::parse_bnb_quant_state(json, keys.quant_state);
  check(state.quant_type == *type, "BnbFormat", "`{}` says quant_type {}", keys.quant_state,
        quant_type_name(state.quant_type));

  const SafetensorsTensor* weight = source.find(keys.weight);
  check(weight != nullptr, "BnbFormat", "missing tensor `{}`", keys.weight);
  // Any quant_storage dtype views the same bytes.
  std::vector<std::uint8_t> packed(weight->data.size());
  if (!packed.empty()) std::memcpy(packed.data(), weight->data.data(), packed.size());

  check(is_valid_4bit_blocksize(state.blocksize), "InvalidBlocksize", "`{}`: blocksize {} is not a power of two in [32, 4096]",
        keys.quant_state, state.blocksize);
  try {
    detail::checked_element_count(state.shape, keys.quant_state);
  } catch (const Error& e) {
    throw Error("BnbFormat", e.message());
  }
  const auto blocks = static_cast<std::size_t>(state.block_count());
  if (state.nested) {
    state.nested->codes = detail::read_companion<std::uint8_t>(source.find(keys.absmax), keys.absmax, DType::U8, blocks);
    state.nested->absmax = detail::read_companion<float>(source.find(keys.nested_absmax), keys.nested_absmax, DType::F32,
                                                         (blocks + nested_blocksize - 1) / nested_blocksize);
    state.nested->code_map =
        detail::read_companion<float>(source.find(keys.nested_quant_map), keys.nested_quant_map, DType::F32, 256);
  } else {
    state.absmax = detail::read_companion<float>(source.find(keys.absmax), keys.absmax, DType::F32, blocks);
  }
  try {
    state.validate(packed.size());
  } catch (const Error& e) {
    throw e.with_context(keys.weight);
  }
  return Quantized4bit{std::move(packed), std::move(state)};
}

/// The tensors of one 4-bit weight in bitsandbytes' layout, ready to add to a
/// SafetensorsWriter. Holds the JSON bytes; the packed data and state are
/// viewed, so `quantized` must outlive the writer's write().
class Bnb4bitTensors {
 public:
  Bnb4bitTensors(std::string weight_name, const Quantized4bit& quantized)
      : keys_(Bnb4bitKeys::of(weight_name, quantized.state.quant_type)),
        quantized_(&quantized),
        json_(bnb_quant_state_json(quantized.state)) {
    quantized.state.validate(quantized.packed.size());
  }

  /// Adds the tensors (views into this object and the Quantized4bit) to `writer`.
  void add_to(SafetensorsWriter& writer) const& {
    const QuantState& state = quantized_->state;
    const auto bytes = [](const auto& range) { return std::as_bytes(std::span(range)); };
    writer.add(keys_.weight, DType::U8, {static_cast<std::int64_t>(quantized_->packed.size()), 1}, bytes(quantized_->packed));
    const std::span<const float, 16> quant_map = state.quant_type == QuantType::nf4 ? std::span(NF4::quant_map) : std::span(FP4::quant_map);
    writer.add(keys_.quant_map, DType::F32, {16}, std::as_bytes(quant_map));
    if (state.nested) {
      writer.add(keys_.absmax, DType::U8, {state.block_count()}, bytes(state.nested->codes));
      writer.add(keys_.nested_absmax, DType::F32, {static_cast<std::int64_t>(state.nested->absmax.size())},
                 bytes(state.nested->absmax));
      writer.add(keys_.nested_quant_map, DType::F32, {256}, bytes(state.nested->code_map));
    } else {
      writer.add(keys_.absmax, DType::F32, {state.block_count()}, bytes(state.absmax));
    }
    writer.add(keys_.quant_state, DType::U8, {static_cast<std::int64_t>(json_.size())}, std::as_bytes(std::span(json_)));
  }
  /// A temporary would die before the writer writes the JSON it views: keep the object alive.
  void add_to(SafetensorsWriter& writer) const&& = delete;

 private:
  Bnb4bitKeys keys_;
  const Quantized4bit* quantized_;
  std::string json_;
};

}  // namespace qlora
