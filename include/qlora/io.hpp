// Umbrella for io/: safetensors files, sharded HF checkpoints, atomic writes.
#pragma once

#include <qlora/io/atomic_file.hpp>
#include <qlora/io/mapped_file.hpp>
#include <qlora/io/safetensors_reader.hpp>
#include <qlora/io/safetensors_tensor.hpp>
#include <qlora/io/safetensors_writer.hpp>
#include <qlora/io/sharded_checkpoint.hpp>
