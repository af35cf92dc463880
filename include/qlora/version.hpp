// qlora's one version number. CMakeLists.txt and meson.build carry the same
// number; tests/version_test.cpp fails if the three ever disagree.
#pragma once

#define QLORA_VERSION_MAJOR 0
#define QLORA_VERSION_MINOR 1
#define QLORA_VERSION_PATCH 0
/// MAJOR*10000 + MINOR*100 + PATCH, as {fmt} encodes FMT_VERSION.
#define QLORA_VERSION (QLORA_VERSION_MAJOR * 10000 + QLORA_VERSION_MINOR * 100 + QLORA_VERSION_PATCH)

namespace qlora {

struct Version {
  int major, minor, patch;
};

/// The version of the headers this translation unit was compiled with.
constexpr Version version() noexcept {
  return {QLORA_VERSION_MAJOR, QLORA_VERSION_MINOR, QLORA_VERSION_PATCH};
}

}  // namespace qlora
