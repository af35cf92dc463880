// ShardedCheckpoint and write_sharded_checkpoint: the weights of a Hugging Face
// model folder, either one model.safetensors or shards listed by
// model.safetensors.index.json, read with cross-checks of index against shards
// and written exactly as huggingface_hub's save_torch_state_dict writes them.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/io/atomic_file.hpp>
#include <qlora/io/detail/json.hpp>
#include <qlora/io/mapped_file.hpp>
#include <qlora/io/safetensors_reader.hpp>
#include <qlora/io/safetensors_tensor.hpp>
#include <qlora/io/safetensors_writer.hpp>

namespace qlora {

/// huggingface_hub's default max_shard_size, "5GB" (decimal: 5 * 10^9 bytes).
inline constexpr std::uint64_t default_max_shard_size = 5'000'000'000;

namespace detail {

inline constexpr std::string_view single_weights_name = "model.safetensors";
inline constexpr std::string_view weights_index_name = "model.safetensors.index.json";
/// huggingface_hub refuses larger index files (MAX_INDEX_FILE_SIZE, serialization/_torch.py).
inline constexpr std::size_t max_index_file_size = std::size_t{10} << 20;

/// "model-00002-of-00005.safetensors", or "model.safetensors" for a single shard
/// (huggingface_hub: "model{suffix}.safetensors" with suffix f"-{i+1:05d}-of-{n:05d}").
inline std::string shard_file_name(std::size_t index, std::size_t count) {
  return count == 1 ? std::string(single_weights_name)
                    : fmt::format("model-{:05d}-of-{:05d}.safetensors", index + 1, count);
}

/// True for the names huggingface_hub deletes before saving a new checkpoint
/// (the regex `model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?`).
inline bool is_weights_file_name(std::string_view name) {
  if (!name.starts_with("model")) return false;
  name.remove_prefix(5);
  const auto digits = [](std::string_view s) { return s.size() == 5 && s.find_first_not_of("0123456789") == s.npos; };
  if (name.size() >= 15 && name[0] == '-' && digits(name.substr(1, 5)) && name.substr(6, 4) == "-of-" &&
      digits(name.substr(10, 5))) {
    name.remove_prefix(15);
  }
  return name == ".safetensors" || name == ".safetensors.index.json";
}

/// huggingface_hub's split (split_state_dict_into_shards_factory): greedy in
/// order; a tensor larger than the limit gets a shard of its own, placed before
/// the shard being filled; returns the tensor indices of each shard.
inline std::vector<std::vector<std::size_t>> plan_shards(std::span<const SafetensorsTensor> tensors,
                                                         std::uint64_t max_shard_size) {
  std::vector<std::vector<std::size_t>> shards;
  std::vector<std::size_t> current;
  std::uint64_t current_size = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const std::uint64_t size = tensors[i].data.size();
    if (size > max_shard_size) {
      shards.push_back({i});
      continue;
    }
    if (current_size + size > max_shard_size) {
      shards.push_back(std::move(current));
      current.clear();
      current_size = 0;
    }
    current.push_back(i);
    current_size += size;
  }
  if (!current.empty() || shards.empty()) shards.push_back(std::move(current));
  return shards;
}

/// Rejects shard names that could leave the folder or are not safetensors, as
/// huggingface_hub's loader does (absolute, drive or "..", either slash).
inline void check_shard_name(std::string_view name, const std::filesystem::path& index) {
  bool parent = false;
  for (std::size_t start = 0; start <= name.size();) {
    const std::size_t stop = std::min(name.find_first_of("/\\", start), name.size());
    parent = parent || name.substr(start, stop - start) == "..";
    start = stop + 1;
  }
  check(!name.empty() && name.front() != '/' && name.front() != '\\' && name.find(':') == name.npos && !parent &&
            name.ends_with(".safetensors"),
        "InvalidShardName",
        "{}: shard file name \"{}\" must be a relative path inside the folder, without \"..\", ending in "
        ".safetensors",
        index.string(), name);
}

}  // namespace detail

/// The weights of a model folder: `model.safetensors`, or else the shards that
/// `model.safetensors.index.json` lists (transformers looks in this order). The
/// index must have a "weight_map" object of tensor name -> shard file (other
/// fields such as "metadata" are ignored); every shard must exist and parse,
/// hold every tensor the index assigns to it, and hold no tensor the index
/// assigns elsewhere or not at all. Tensors are views into the mapped shards.
///
///     auto checkpoint = ShardedCheckpoint::open("models/phi-2");
///     std::vector<bf16> w = checkpoint.tensor("lm_head.weight").read<bf16>();
class ShardedCheckpoint {
 public:
  /// Opens and cross-checks the folder. Errors: CheckpointNotFound, InvalidIndex,
  /// DuplicateKey (a name listed twice), InvalidShardName, ShardNotFound,
  /// TensorNotInShard, UnlistedTensor, and any SafetensorsReader error (naming the shard).
  [[nodiscard]] static ShardedCheckpoint open(const std::filesystem::path& folder) {
    ShardedCheckpoint checkpoint;
    checkpoint.folder_ = folder;
    const std::filesystem::path single = folder / detail::single_weights_name;
    const std::filesystem::path index = folder / detail::weights_index_name;
    std::error_code ignored;
    if (std::filesystem::exists(single, ignored)) {
      checkpoint.add_shard(single);
      for (const SafetensorsTensor& t : checkpoint.shards_[0].tensors()) checkpoint.shard_of_.emplace(t.name, 0);
    } else if (std::filesystem::exists(index, ignored)) {
      checkpoint.open_index(index);
    } else {
      throw Error("CheckpointNotFound", fmt::format("{} holds neither {} nor {}", folder.string(),
                                                    detail::single_weights_name, detail::weights_index_name));
    }
    return checkpoint;
  }

  /// The folder given to open().
  [[nodiscard]] const std::filesystem::path& folder() const noexcept { return folder_; }
  /// The shard files, in file-name order.
  [[nodiscard]] std::span<const SafetensorsReader> shards() const noexcept { return shards_; }
  /// Number of tensors across all shards.
  [[nodiscard]] std::size_t size() const noexcept { return shard_of_.size(); }

  /// The tensor called `name` in whichever shard holds it, or nullptr.
  [[nodiscard]] const SafetensorsTensor* find(std::string_view name) const noexcept {
    const auto it = shard_of_.find(name);
    return it == shard_of_.end() ? nullptr : shards_[it->second].find(name);
  }
  /// The tensor called `name`; throws Error("TensorNotFound").
  [[nodiscard]] const SafetensorsTensor& tensor(std::string_view name) const {
    const SafetensorsTensor* found = find(name);
    check(found != nullptr, "TensorNotFound", "{}: no tensor `{}` in the checkpoint", folder_.string(), name);
    return *found;
  }

 private:
  ShardedCheckpoint() = default;

  std::size_t add_shard(const std::filesystem::path& path) {
    shards_.push_back(SafetensorsReader::open(path));
    return shards_.size() - 1;
  }

  void open_index(const std::filesystem::path& index) {
    const MappedFile file(index);
    check(file.size() <= detail::max_index_file_size, "InvalidIndex",
          "{}: {} bytes is over the {}-byte limit for an index", index.string(), file.size(),
          detail::max_index_file_size);
    const std::string_view text(reinterpret_cast<const char*>(file.bytes().data()), file.size());
    const detail::Json json = detail::parse_json_rejecting_duplicates(text, "InvalidIndex", index.string());
    check(json.is_object() && json.contains("weight_map") && json["weight_map"].is_object(), "InvalidIndex",
          "{}: expected a JSON object with a \"weight_map\" object", index.string());
    const detail::Json& weight_map = json["weight_map"];

    // Open each shard once, in file-name order.
    std::map<std::string, std::size_t, std::less<>> shard_index;
    for (const auto& [name, file_name] : weight_map.items()) {
      check(file_name.is_string(), "InvalidIndex", "{}: weight_map[\"{}\"] must be a file name string", index.string(),
            name);
      const auto& shard = file_name.get_ref<const std::string&>();
      detail::check_shard_name(shard, index);
      shard_index.emplace(shard, 0);
    }
    for (auto& [shard, position] : shard_index) {
      const std::filesystem::path path = folder_ / shard;
      std::error_code ignored;
      check(std::filesystem::is_regular_file(path, ignored), "ShardNotFound", "{}: shard {} does not exist",
            index.string(), path.string());
      position = add_shard(path);
    }

    for (const auto& [name, file_name] : weight_map.items()) {
      const auto& shard = file_name.get_ref<const std::string&>();
      const std::size_t position = shard_index.find(shard)->second;
      check(shards_[position].find(name) != nullptr, "TensorNotInShard",
            "{}: the index puts tensor `{}` in {}, which does not hold it", index.string(), name, shard);
      shard_of_.emplace(name, position);
    }
    for (const auto& [shard, position] : shard_index) {
      for (const SafetensorsTensor& t : shards_[position].tensors()) {
        const auto listed = shard_of_.find(t.name);
        check(listed != shard_of_.end() && listed->second == position, "UnlistedTensor",
              "{}: shard {} holds tensor `{}`, which the index {}", index.string(), shard, t.name,
              listed == shard_of_.end() ? std::string("does not list")
                                        : fmt::format("assigns to {}", shards_[listed->second].source()));
      }
    }
  }

  std::filesystem::path folder_;
  std::vector<SafetensorsReader> shards_;
  std::map<std::string, std::size_t, std::less<>> shard_of_;  // tensor name -> index into shards_
};

/// Writes `weights` into `folder` (created if needed) as huggingface_hub's
/// save_torch_state_dict does, so that the files are byte-identical to its own:
/// tensors are split into shards greedily in the order they were added (a tensor
/// over `max_shard_size` bytes gets its own shard); one shard is written as
/// model.safetensors without an index; several as model-0000i-of-0000n.safetensors
/// plus model.safetensors.index.json ({"metadata": {"total_size": bytes of all
/// tensors}, "weight_map": {...}}, indent 2, ASCII-escaped, like json.dump).
/// Every shard carries `weights.metadata()`. Each file is written atomically, the
/// index last; then weight files of an earlier save that the new one does not
/// use are deleted (as huggingface_hub deletes them, but after writing). An
/// empty `weights` gives an empty model.safetensors (huggingface_hub writes nothing).
inline void write_sharded_checkpoint(const std::filesystem::path& folder, const SafetensorsWriter& weights,
                                     std::uint64_t max_shard_size = default_max_shard_size) {
  std::error_code error;
  std::filesystem::create_directories(folder, error);
  check(!error, "IoError", "cannot create {}: {}", folder.string(), error.message());
  const std::span<const SafetensorsTensor> tensors = weights.tensors();
  const std::vector<std::vector<std::size_t>> shards = detail::plan_shards(tensors, max_shard_size);
  std::set<std::string, std::less<>> written;
  for (std::size_t s = 0; s < shards.size(); ++s) {
    SafetensorsWriter shard;
    shard.set_metadata(weights.metadata());
    for (const std::size_t i : shards[s]) shard.add(tensors[i]);
    const std::string name = detail::shard_file_name(s, shards.size());
    shard.write(folder / name);
    written.insert(name);
  }
  if (shards.size() > 1) {
    std::uint64_t total_size = 0;
    for (const SafetensorsTensor& t : tensors) total_size += t.data.size();
    std::string index =
        fmt::format("{{\n  \"metadata\": {{\n    \"total_size\": {}\n  }},\n  \"weight_map\": {{", total_size);
    for (std::size_t s = 0; s < shards.size(); ++s) {
      for (const std::size_t i : shards[s]) {
        index += index.back() == '{' ? "\n    " : ",\n    ";
        detail::append_json_string(index, tensors[i].name, detail::JsonEscape::ascii);
        index += ": ";
        detail::append_json_string(index, detail::shard_file_name(s, shards.size()), detail::JsonEscape::ascii);
      }
    }
    index += "\n  }\n}";
    write_file_atomically(folder / detail::weights_index_name, [&](AtomicFile& file) { file.write(index); });
    written.insert(std::string(detail::weights_index_name));
  }
  for (std::filesystem::directory_iterator it(folder, error), end; !error && it != end; it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (detail::is_weights_file_name(name) && !written.contains(name) && it->is_regular_file(error)) {
      std::filesystem::remove(it->path(), error);
      check(!error, "IoError", "cannot remove {}, left from an earlier save: {}", it->path().string(), error.message());
    }
  }
  check(!error, "IoError", "cannot list {} to remove files left from an earlier save: {}", folder.string(),
        error.message());
}

}  // namespace qlora
