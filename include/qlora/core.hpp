// Umbrella for core/: element types, tensors, errors, RNG, threading, heap tuning.
#pragma once

#include <qlora/core/device.hpp>
#include <qlora/core/dtype.hpp>
#include <qlora/core/error.hpp>
#include <qlora/core/heap_retention.hpp>
#include <qlora/core/parallel.hpp>
#include <qlora/core/rng.hpp>
#include <qlora/core/tensor.hpp>
#include <qlora/core/tensor_view.hpp>
