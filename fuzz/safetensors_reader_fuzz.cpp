// libFuzzer target for the safetensors reader: any byte string must either
// parse or be refused with qlora::Error. What parses must also survive every
// accessor and a round trip through the writer (write, parse again, same
// tensors), so a reader that accepts something the writer cannot express, or
// lists tensors that are not really there, aborts the run.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <span>
#include <vector>

#include <qlora/io/safetensors_reader.hpp>
#include <qlora/io/safetensors_writer.hpp>

namespace {

/// Reads every tensor through the typed API its dtype allows.
void touch(const qlora::SafetensorsTensor& t) {
  using qlora::DType;
  switch (t.dtype) {
    case DType::F32:
      (void)t.read<float>();
      break;
    case DType::F64:
      (void)t.read<double>();
      break;
    case DType::BF16:
      (void)t.read<qlora::bf16>();
      break;
    case DType::F16:
      (void)t.read<qlora::fp16>();
      break;
    case DType::BOOL:
      (void)t.read<bool>();
      break;
    case DType::I64:
      (void)t.read<std::int64_t>();
      break;
    default:
      (void)t.read<std::uint8_t>();
      break;  // DTypeMismatch unless U8
  }
}

void require(bool condition) {
  if (!condition) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto bytes = std::as_bytes(std::span(data, size));
  std::optional<qlora::SafetensorsReader> reader;
  try {
    reader.emplace(qlora::SafetensorsReader::parse(bytes));
  } catch (const qlora::Error&) {
    return 0;
  }
  qlora::SafetensorsWriter writer;
  for (const qlora::SafetensorsTensor& t : reader->tensors()) {
    require(reader->find(t.name) == &t);
    require(t.data.data() >= bytes.data() && t.data.data() + t.data.size() <= bytes.data() + bytes.size());
    try {
      touch(t);
    } catch (const qlora::Error& e) {
      require(e.code() == "DTypeMismatch");
    }
    writer.add(t);  // must not throw: the reader accepted it
  }
  writer.set_metadata(reader->metadata());
  const std::vector<std::byte> rewritten = writer.serialize();
  const auto again = qlora::SafetensorsReader::parse(rewritten);
  require(again.tensors().size() == reader->tensors().size());
  for (const qlora::SafetensorsTensor& t : reader->tensors()) {
    const qlora::SafetensorsTensor* copy = again.find(t.name);
    require(copy != nullptr && copy->dtype == t.dtype && copy->shape == t.shape &&
            std::equal(copy->data.begin(), copy->data.end(), t.data.begin(), t.data.end()));
  }
  require(again.metadata() == reader->metadata());
  return 0;
}
