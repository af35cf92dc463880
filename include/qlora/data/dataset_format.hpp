// DatasetFormat: the four JSONL record layouts training data comes in, and the
// conversion of one record into a qlora::Conversation. The conversion keeps
// every message in file order (leading assistant messages, consecutive user
// messages, a trailing question): what a template does with them is the
// template's business (data/chat_template.hpp), not the reader's. It is strict
// about types where XTuner is lenient in ways that silently change training:
// XTuner turns `"output_with_loss": "false"` (a truthy string) into a learned
// answer and `"loss": "no"` or `"loss": 0` into an unlearned one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include <qlora/core/error.hpp>
#include <qlora/data/conversation.hpp>
#include <qlora/data/json_document.hpp>

namespace qlora {

enum class DatasetFormat : std::uint8_t {
  /// Chosen from the first record's keys, then required of every record.
  detect,
  /// XTuner's own: {"conversation": [{"system"?, "input"?, "output", "output_with_loss"?}, ...]}.
  /// Each turn becomes a system message (when "system" is a non-empty string,
  /// as XTuner's template_map_fn has it), a user message ("input"; absent or
  /// null is "", as in XTuner) and an assistant message whose loss is
  /// "output_with_loss" (a JSON boolean, default true).
  xtuner,
  /// OpenAI's chat layout, as XTuner's openai_map_fn reads it:
  /// {"messages": [{"role": "system"|"user"|"assistant", "content": str, "loss"?}, ...]}.
  /// An assistant message's "loss" is true, false, or a string equal to "true"
  /// or "false" ignoring case (XTuner compares str(loss).lower() with "true");
  /// absent is true. "loss" on other roles is ignored, as XTuner does.
  openai,
  /// The Phi-2 tutorial's riddles: {"messages": [str, str, ...]}, alternately
  /// user and assistant, user first; other keys ignored.
  alternating,
  /// Pre-training documents: {"text": str}, one Role::text message.
  text,
};

[[nodiscard]] constexpr std::string_view dataset_format_name(DatasetFormat format) noexcept {
  switch (format) {
    case DatasetFormat::detect:
      return "detect";
    case DatasetFormat::xtuner:
      return "xtuner";
    case DatasetFormat::openai:
      return "openai";
    case DatasetFormat::alternating:
      return "alternating";
    case DatasetFormat::text:
      return "text";
  }
  return "?";
}

/// The format named `name` (dataset_format_name's spelling, e.g. from a command
/// line); Error("UnknownFormat") for any other name.
[[nodiscard]] inline DatasetFormat parse_dataset_format(std::string_view name) {
  for (const DatasetFormat format : {DatasetFormat::detect, DatasetFormat::xtuner, DatasetFormat::openai,
                                     DatasetFormat::alternating, DatasetFormat::text}) {
    if (dataset_format_name(format) == name) return format;
  }
  throw Error("UnknownFormat",
              fmt::format("unknown dataset format \"{}\" (expected detect, xtuner, openai, alternating or text)", name));
}

namespace detail {

/// Where a value is in a record: "conversation[2].output". Formatted only for errors.
struct JsonPath {
  std::string_view array;
  std::optional<std::size_t> index;
  std::string_view field;

  [[nodiscard]] std::string text() const {
    std::string out(array);
    if (index) out += fmt::format("[{}]", *index);
    if (!field.empty()) out += fmt::format("{}{}", out.empty() ? "" : ".", field);
    return out;
  }
};

[[noreturn]] inline void throw_wrong_type(const JsonPath& path, std::string_view expected, JsonValue value) {
  throw Error("WrongType", fmt::format("`{}`: expected {}, got {}", path.text(), expected, json_type_name(value.type())));
}

/// `value` (the member at `path`) as a string: Error("MissingField") when absent,
/// ("WrongType") when not a string, unless `null_is_empty` lets null be "".
inline std::string_view string_field(std::optional<JsonValue> value, const JsonPath& path, bool null_is_empty = false) {
  if (!value) throw Error("MissingField", fmt::format("`{}` is missing", path.text()));
  if (null_is_empty && value->is(JsonType::null)) return {};
  if (!value->is(JsonType::string)) throw_wrong_type(path, "a string", *value);
  return value->as_string();
}

/// The non-empty array member `key` of `record`.
inline JsonValue array_field(JsonValue record, std::string_view key) {
  const std::optional<JsonValue> value = record.find(key);
  const JsonPath path{{}, {}, key};
  if (!value) throw Error("MissingField", fmt::format("`{}` is missing", path.text()));
  if (!value->is(JsonType::array)) throw_wrong_type(path, "an array", *value);
  if (value->size() == 0) throw Error("EmptyConversation", fmt::format("`{}` is empty: there is nothing to learn", path.text()));
  return *value;
}

/// Appends messages to a Conversation whose buffers are reused: the strings of
/// the previous record's messages keep their capacity.
class MessageWriter {
 public:
  explicit MessageWriter(Conversation& out) noexcept : out_(out) {}
  MessageWriter(const MessageWriter&) = delete;
  MessageWriter& operator=(const MessageWriter&) = delete;
  ~MessageWriter() { out_.messages.resize(used_); }

  void add(Role role, std::string_view content, bool loss) {
    if (used_ == out_.messages.size()) out_.messages.emplace_back();
    Message& message = out_.messages[used_++];
    message.role = role;
    message.content.assign(content);
    message.loss = loss;
  }

 private:
  Conversation& out_;
  std::size_t used_ = 0;
};

inline void read_xtuner(JsonValue record, MessageWriter& out) {
  std::size_t index = 0;
  for (const JsonValue turn : array_field(record, "conversation").elements()) {
    const auto path = [&](std::string_view field) { return JsonPath{"conversation", index, field}; };
    if (!turn.is(JsonType::object)) throw_wrong_type(path({}), "an object", turn);
    if (const std::optional<JsonValue> system = turn.find("system"); system && !system->is(JsonType::null)) {
      const std::string_view text = string_field(system, path("system"));
      if (!text.empty()) out.add(Role::system, text, false);
    }
    const std::optional<JsonValue> input = turn.find("input");
    out.add(Role::user, input ? string_field(input, path("input"), true) : std::string_view(), false);
    bool loss = true;
    if (const std::optional<JsonValue> with_loss = turn.find("output_with_loss")) {
      if (!with_loss->is(JsonType::boolean)) throw_wrong_type(path("output_with_loss"), "true or false", *with_loss);
      loss = with_loss->as_bool();
    }
    out.add(Role::assistant, string_field(turn.find("output"), path("output")), loss);
    ++index;
  }
}

/// An assistant message's "loss", with XTuner's meaning (see DatasetFormat::openai).
inline bool openai_loss(std::optional<JsonValue> loss, const JsonPath& path) {
  if (!loss) return true;
  if (loss->is(JsonType::boolean)) return loss->as_bool();
  const auto equals_ignoring_case = [](std::string_view text, std::string_view lower) {
    if (text.size() != lower.size()) return false;
    for (std::size_t i = 0; i < text.size(); ++i) {
      const char c = text[i] >= 'A' && text[i] <= 'Z' ? static_cast<char>(text[i] - 'A' + 'a') : text[i];
      if (c != lower[i]) return false;
    }
    return true;
  };
  if (loss->is(JsonType::string)) {
    const std::string_view text = loss->as_string();
    if (equals_ignoring_case(text, "true")) return true;
    if (equals_ignoring_case(text, "false")) return false;
    // XTuner would read anything else ("yes", "1") as false, without a word.
    throw Error("InvalidValue", fmt::format("`{}`: expected true, false, \"true\" or \"false\", got \"{}\"", path.text(), text));
  }
  throw_wrong_type(path, "true, false, \"true\" or \"false\"", *loss);
}

inline void read_openai(JsonValue record, MessageWriter& out) {
  std::size_t index = 0;
  for (const JsonValue message : array_field(record, "messages").elements()) {
    const auto path = [&](std::string_view field) { return JsonPath{"messages", index, field}; };
    if (!message.is(JsonType::object)) throw_wrong_type(path({}), "an object", message);
    const std::string_view role = string_field(message.find("role"), path("role"));
    const std::string_view content = string_field(message.find("content"), path("content"));
    if (role == "system") {
      out.add(Role::system, content, false);
    } else if (role == "user") {
      out.add(Role::user, content, false);
    } else if (role == "assistant") {
      out.add(Role::assistant, content, openai_loss(message.find("loss"), path("loss")));
    } else {
      throw Error("UnknownRole",
                  fmt::format("`{}`: unknown role \"{}\" (expected system, user or assistant)", path("role").text(), role));
    }
    ++index;
  }
}

inline void read_alternating(JsonValue record, MessageWriter& out) {
  std::size_t index = 0;
  for (const JsonValue message : array_field(record, "messages").elements()) {
    const JsonPath path{"messages", index, {}};
    if (!message.is(JsonType::string)) throw_wrong_type(path, "a string", message);
    const bool from_user = index % 2 == 0;
    out.add(from_user ? Role::user : Role::assistant, message.as_string(), !from_user);
    ++index;
  }
}

}  // namespace detail

/// The format of `record` by its keys: "conversation" → xtuner; "messages" →
/// openai if its first element is an object, alternating if a string; "text" →
/// text. Errors: "UnknownFormat" (none of the keys), "AmbiguousFormat" (more
/// than one), "EmptyConversation" and "WrongType" (messages empty or not a list
/// of strings or objects: nothing to tell the two apart by).
[[nodiscard]] inline DatasetFormat detect_dataset_format(JsonValue record) {
  const std::optional<JsonValue> conversation = record.find("conversation");
  const std::optional<JsonValue> messages = record.find("messages");
  const std::optional<JsonValue> text = record.find("text");
  const int found = int{conversation.has_value()} + int{messages.has_value()} + int{text.has_value()};
  if (found == 0) {
    std::string keys;
    for (const JsonMember& member : record.members()) keys += fmt::format("{}\"{}\"", keys.empty() ? "" : ", ", member.key);
    throw Error("UnknownFormat", fmt::format("cannot tell the dataset format: the record has none of the keys "
                                             "\"conversation\", \"messages\" and \"text\" (it has: {})",
                                             keys.empty() ? "no keys" : keys));
  }
  if (found > 1) {
    throw Error("AmbiguousFormat", "cannot tell the dataset format: the record has more than one of the keys "
                                   "\"conversation\", \"messages\" and \"text\"; name the format");
  }
  if (conversation) return DatasetFormat::xtuner;
  if (text) return DatasetFormat::text;
  const JsonValue first = *detail::array_field(record, "messages").elements().begin();
  if (first.is(JsonType::object)) return DatasetFormat::openai;
  if (first.is(JsonType::string)) return DatasetFormat::alternating;
  detail::throw_wrong_type({"messages", 0, {}}, "an object (openai) or a string (alternating)", first);
}

/// Converts `record` (one JSONL line) in `format` into `out`, reusing its
/// buffers; `out.line` is left to the caller. Errors name the JSON path
/// (`conversation[2].output`), not the file: "MissingField", "WrongType",
/// "InvalidValue" (a "loss" string other than true/false), "UnknownRole",
/// "EmptyConversation"; DatasetFormat::detect detects first.
inline void read_conversation(JsonValue record, DatasetFormat format, Conversation& out) {
  if (format == DatasetFormat::detect) format = detect_dataset_format(record);
  detail::MessageWriter writer(out);
  switch (format) {
    case DatasetFormat::xtuner:
      detail::read_xtuner(record, writer);
      break;
    case DatasetFormat::openai:
      detail::read_openai(record, writer);
      break;
    case DatasetFormat::alternating:
      detail::read_alternating(record, writer);
      break;
    case DatasetFormat::text:
      writer.add(Role::text, detail::string_field(record.find("text"), {{}, {}, "text"}), true);
      break;
    case DatasetFormat::detect:
      break;  // replaced above
  }
}

}  // namespace qlora
