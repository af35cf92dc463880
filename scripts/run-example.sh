#!/usr/bin/env bash
# Builds and runs qlora's main example, examples/train (qlora-train): QLoRA
# fine-tuning of a Phi or InternLM2 model. With no arguments it fine-tunes the
# tiny pre-trained Phi shipped in examples/assets on the self-identity data
# there (a few minutes on 2 CPU cores) and prints its answers to the eval
# prompts before and after.
# On a fresh Debian 12 machine it first installs what it needs (apt-get).
#   scripts/run-example.sh [arguments for the example; --help lists them]
# Environment: QLORA_EXAMPLE (target, default train; also chat, merge, quantize, change_script), QLORA_BUILD_DIR
# (default build-example), QLORA_JOBS (default: all cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh cmake ninja-build g++ pkg-config libfmt-dev nlohmann-json3-dev \
  libeigen3-dev libsentencepiece-dev libpcre2-dev

example=${QLORA_EXAMPLE:-train}
build_dir=${QLORA_BUILD_DIR:-build-example}
jobs=${QLORA_JOBS:-$(nproc)}

if [ ! -f examples/CMakeLists.txt ]; then
  echo "run-example: examples/CMakeLists.txt is not in this checkout yet" >&2
  exit 1
fi
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
launcher=()
if command -v ccache >/dev/null 2>&1; then
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache)
fi

# A folder configured before (by this script, or scripts/run-tests.sh's build-tests, which builds the
# examples too) is built as it is: reconfiguring it with other options would rebuild everything.
if [ ! -f "$build_dir/CMakeCache.txt" ]; then
  cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DQLORA_BUILD_TESTS=OFF -DQLORA_BUILD_BENCHMARKS=OFF -DQLORA_BUILD_EXAMPLES=ON \
    "${launcher[@]}" >/dev/null
fi
cmake --build "$build_dir" -j "$jobs" --target "$example"

# The executable is named after its target; find where examples/ put it.
exe=$(find "$build_dir" -type f -perm -u+x \( -name "$example" -o -name "qlora-$example" \) \
        -not -path '*/CMakeFiles/*' | head -n 1)
if [ -z "$exe" ]; then
  echo "run-example: built target '$example' but found no executable of that name" >&2
  exit 1
fi
echo "+ $exe $*"
exec "$exe" "$@"
