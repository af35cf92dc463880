// A private temporary folder for fuzz targets whose parser reads files
// (from_pretrained reads a folder): made once per process, the fixed files
// linked into it, the fuzzed one rewritten for each input, removed at exit.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

namespace qlora_fuzz {

class ScratchDir {
 public:
  /// A new folder named after `target`, holding a link `link_name` to `fixed`.
  ScratchDir(std::string_view target, const std::filesystem::path& fixed, std::string_view link_name) {
    std::string pattern = (std::filesystem::temp_directory_path() / (std::string(target) + "-XXXXXX")).string();
    if (::mkdtemp(pattern.data()) == nullptr) std::abort();
    path_ = pattern;
    std::filesystem::create_symlink(std::filesystem::absolute(fixed), path_ / link_name);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  ~ScratchDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }

  /// Replaces file `name` in the folder with `bytes`.
  void write(std::string_view name, std::string_view bytes) const {
    std::ofstream out(path_ / name, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out.flush()) std::abort();
  }

  [[nodiscard]] const std::filesystem::path& path() const noexcept { return path_; }

 private:
  std::filesystem::path path_;
};

}  // namespace qlora_fuzz
