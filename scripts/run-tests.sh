#!/usr/bin/env bash
# Builds qlora's tests with CMake and runs them (everything but the GPU tests).
# On a fresh Debian 12 machine it first installs what it needs (apt-get).
#   scripts/run-tests.sh [ctest arguments, e.g. -R quant]
# Environment: QLORA_BUILD_DIR (default build-tests), QLORA_JOBS (default: all
# cores), QLORA_BUILD_TYPE (default Release; without
# debug info the template-heavy tests compile about a third faster), QLORA_CMAKE_ARGS (extra
# configure arguments).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh cmake ninja-build g++ pkg-config catch2 libfmt-dev \
  nlohmann-json3-dev libeigen3-dev libbenchmark-dev meson libsentencepiece-dev libpcre2-dev \
  libopenmpi-dev openmpi-bin

build_dir=${QLORA_BUILD_DIR:-build-tests}
jobs=${QLORA_JOBS:-$(nproc)}

# nvcc is often installed off PATH; with it, CMake also builds (not runs) the CUDA parts.
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi

# shellcheck disable=SC2086  # QLORA_CMAKE_ARGS is split on purpose
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE="${QLORA_BUILD_TYPE:-Release}" \
  "${launcher[@]}" ${QLORA_CMAKE_ARGS:-}
cmake --build "$build_dir" -j "$jobs"
ctest --test-dir "$build_dir" --output-on-failure -LE gpu -j "$jobs" "$@"
