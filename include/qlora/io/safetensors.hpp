// The safetensors format: SafetensorsReader (validated, zero-copy reading) and
// SafetensorsWriter (byte-identical to Python's save_file, atomic).
#pragma once

#include <qlora/io/safetensors_reader.hpp>  // IWYU pragma: export
#include <qlora/io/safetensors_writer.hpp>  // IWYU pragma: export
