// qlora_chat.json: how a fine-tuned model expects to be prompted. qlora-train
// writes it next to the adapter (the template and system prompt the adapter
// learned with), qlora-merge carries it into the merged folder, and qlora-chat
// uses it when --template / --system are not given, so that chatting with a
// model is prompted as it was trained.
//
//   {"chat_template": "chatml", "system": ""}
#pragma once

#include <qlora/core/error.hpp>
#include <qlora/io/atomic_file.hpp>
#include <qlora/io/detail/json.hpp>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>

namespace qlora::examples {

inline constexpr const char* chat_settings_file = "qlora_chat.json";

struct ChatSettings {
  std::string chat_template;  ///< chatml | internlm2_chat | phi2_chatml | pretrain
  std::string system;
};

inline void write_chat_settings(const std::filesystem::path& folder, const ChatSettings& settings) {
  const qlora::detail::OrderedJson json = {{"chat_template", settings.chat_template}, {"system", settings.system}};
  write_file_atomically(folder / chat_settings_file, [&](AtomicFile& file) { file.write(json.dump(2) + "\n"); });
}

/// The settings in `folder`, if it has the file; a file that is not what
/// write_chat_settings writes is an error naming it.
inline std::optional<ChatSettings> read_chat_settings(const std::filesystem::path& folder) {
  const std::filesystem::path path = folder / chat_settings_file;
  if (!std::filesystem::is_regular_file(path)) return std::nullopt;
  std::ifstream in(path);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const qlora::detail::Json json = qlora::detail::parse_json_rejecting_duplicates(text, "InvalidChatSettings", path.string());
  const auto field = [&](const char* name) {
    check(json.is_object() && json.contains(name) && json[name].is_string(), "InvalidChatSettings",
          "{}: expected a string \"{}\"", path.string(), name);
    return json[name].get<std::string>();
  };
  return ChatSettings{.chat_template = field("chat_template"), .system = field("system")};
}

}  // namespace qlora::examples
