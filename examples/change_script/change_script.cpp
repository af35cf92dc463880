// qlora-change_script: replaces a text with another in every string value of
// every record of a JSONL file, as the XTuner tutorial's change_script.py does
// to turn its self-identity data set into one with another assistant name.
//
//   qlora-change_script INPUT OUTPUT [OLD NEW] [--old_text OLD] [--new_text NEW]
//                       [--skip-bad-lines]
//
// OLD and NEW default to the tutorial's 尖米 and 闻星; --old_text/--new_text are
// the tutorial's spelling. The output is what the tutorial's script writes
// (json.dumps with ensure_ascii=False: ", " and ": " separators, key order
// kept, non-ASCII characters as they are, keys left alone) with two
// differences: numbers are copied as written (Python re-prints floats: 1e5
// becomes 100000.0) and blank lines are skipped (they stop Python's json.loads).
// It reads in constant memory, writes OUTPUT atomically (until the end the
// path keeps its old content, so OUTPUT may be INPUT), and shows its progress
// on stderr. A bad line stops it with file:line:column, unless --skip-bad-lines.
#include <qlora/data/json_document.hpp>
#include <qlora/data/jsonl_reader.hpp>
#include <qlora/io/atomic_file.hpp>
#include <qlora/io/detail/json.hpp>

#include <fmt/format.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <unistd.h>

namespace {

using namespace qlora;

// The tutorial's argparse defaults (its assistant's old and new name).
constexpr std::string_view default_old_text = "尖米";
constexpr std::string_view default_new_text = "闻星";

struct Options {
  std::filesystem::path input;
  std::filesystem::path output;
  std::string old_text{default_old_text};
  std::string new_text{default_new_text};
  bool skip_bad_lines = false;
};

void print_usage(std::FILE* to) {
  fmt::print(to,
             "usage: qlora-change_script INPUT OUTPUT [OLD NEW] [--old_text OLD] [--new_text NEW] [--skip-bad-lines]\n"
             "Replaces OLD with NEW in every string value (not in keys) of every record of the JSONL file\n"
             "INPUT and writes the records to OUTPUT as Python's json.dumps(ensure_ascii=False) would.\n"
             "OLD and NEW default to \"{}\" and \"{}\", as in the XTuner tutorial's change_script.py.\n"
             "--skip-bad-lines: leave out lines that are not JSON objects (they are counted and\n"
             "                  the first ones reported) instead of stopping at the first.\n",
             default_old_text, default_new_text);
}

/// Exit status 2, as Python's argparse, for a command line it cannot use.
[[noreturn]] void usage_error(std::string_view message) {
  print_usage(stderr);
  fmt::print(stderr, "qlora-change_script: {}\n", message);
  std::exit(2);
}

Options parse_options(int argc, char** argv) {
  Options options;
  std::vector<std::string> positional;
  std::optional<std::string> old_flag, new_flag;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 == argc) usage_error(fmt::format("{} needs a value", arg));
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      print_usage(stdout);
      std::exit(0);
    } else if (arg == "--old_text") {
      old_flag = value();
    } else if (arg == "--new_text") {
      new_flag = value();
    } else if (arg == "--skip-bad-lines") {
      options.skip_bad_lines = true;
    } else if (arg.starts_with("--")) {
      usage_error(fmt::format("unknown option {}", arg));
    } else {
      positional.emplace_back(arg);
    }
  }
  if (positional.size() != 2 && positional.size() != 4) {
    usage_error(fmt::format("expected INPUT OUTPUT [OLD NEW], got {} argument{}", positional.size(),
                            positional.size() == 1 ? "" : "s"));
  }
  if (positional.size() == 4 && (old_flag || new_flag)) usage_error("give OLD and NEW either as arguments or as flags");
  options.input = positional[0];
  options.output = positional[1];
  if (positional.size() == 4) {
    options.old_text = positional[2];
    options.new_text = positional[3];
  }
  if (old_flag) options.old_text = *old_flag;
  if (new_flag) options.new_text = *new_flag;
  // Python's str.replace("", x) puts x between every two characters: surely not what was meant.
  if (options.old_text.empty()) usage_error("the text to replace is empty");
  return options;
}

/// Progress on stderr: one line redrawn with "\r" on a terminal; elsewhere (a
/// CI log, a file) a line at every tenth of the input, so logs stay readable.
class ProgressBar {
 public:
  explicit ProgressBar(std::optional<std::uint64_t> total_bytes)
      : total_(total_bytes), on_terminal_(::isatty(::fileno(stderr)) == 1), start_(Clock::now()) {}
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;
  /// Ends a bar left half drawn by an error, so that the message starts on its own line.
  ~ProgressBar() {
    if (on_terminal_ && drawn_ && !finished_) fmt::print(stderr, "\n");
  }

  void update(std::uint64_t bytes, std::uint64_t records) {
    if (on_terminal_) {
      const Clock::time_point now = Clock::now();
      if (now - last_draw_ < std::chrono::milliseconds(100)) return;
      last_draw_ = now;
      drawn_ = true;
      fmt::print(stderr, "\r{}", line(bytes, records));
      std::fflush(stderr);
    } else if (total_ && *total_ > 0) {
      const std::uint64_t tenth = bytes * 10 / *total_;
      if (tenth <= printed_tenth_ || tenth == 10) return;  // 100% is finish()'s line
      printed_tenth_ = tenth;
      fmt::print(stderr, "{}\n", line(bytes, records));
    }
  }

  /// The final state, always shown.
  void finish(std::uint64_t bytes, std::uint64_t records) {
    finished_ = true;
    fmt::print(stderr, "{}{}\n", on_terminal_ ? "\r" : "", line(bytes, records));
  }

 private:
  using Clock = std::chrono::steady_clock;

  /// "512 B", "3.4 kB", "12.0 MB", "1.2 GB".
  static std::string human(double bytes) {
    if (bytes < 1e3) return fmt::format("{:.0f} B", bytes);
    if (bytes < 1e6) return fmt::format("{:.1f} kB", bytes / 1e3);
    if (bytes < 1e9) return fmt::format("{:.1f} MB", bytes / 1e6);
    return fmt::format("{:.2f} GB", bytes / 1e9);
  }

  std::string line(std::uint64_t bytes, std::uint64_t records) const {
    const double seconds = std::chrono::duration<double>(Clock::now() - start_).count();
    const double done = static_cast<double>(bytes);
    const std::string speed = fmt::format("{}/s", human(seconds > 0 ? done / seconds : 0.0));
    if (!total_ || *total_ == 0) return fmt::format("{}, {} records, {}", human(done), records, speed);
    const double fraction = done / static_cast<double>(*total_);
    constexpr int width = 30;
    const int filled = static_cast<int>(fraction * width);
    return fmt::format("[{:#<{}}{:.<{}}] {:5.1f}%  {} of {}, {} records, {}", "", filled, "", width - filled,
                       100 * fraction, human(done), human(static_cast<double>(*total_)), records, speed);
  }

  std::optional<std::uint64_t> total_;
  bool on_terminal_;
  Clock::time_point start_;
  Clock::time_point last_draw_{};
  std::uint64_t printed_tenth_ = 0;
  bool drawn_ = false;
  bool finished_ = false;
};

/// Writes JSON values back as CPython's json.dumps(ensure_ascii=False) does,
/// with OLD replaced by NEW in every string value.
class Rewriter {
 public:
  Rewriter(std::string old_text, std::string new_text) : old_(std::move(old_text)), new_(std::move(new_text)) {}

  void append(std::string& out, JsonValue value) {
    switch (value.type()) {
      case JsonType::null:
        out += "null";
        break;
      case JsonType::boolean:
        out += value.as_bool() ? "true" : "false";
        break;
      case JsonType::number:
        out += value.number_text();
        break;
      case JsonType::string:
        detail::append_json_string(out, replaced(value.as_string()), detail::JsonEscape::minimal);
        break;
      case JsonType::array: {
        out += '[';
        const char* separator = "";
        for (const JsonValue element : value.elements()) {
          out += std::exchange(separator, ", ");
          append(out, element);  // depth is bounded by JsonDocument::max_depth
        }
        out += ']';
        break;
      }
      case JsonType::object: {
        out += '{';
        const char* separator = "";
        for (const JsonMember& member : value.members()) {
          out += std::exchange(separator, ", ");
          detail::append_json_string(out, member.key, detail::JsonEscape::minimal);  // keys are kept, as in the tutorial
          out += ": ";
          append(out, member.value);
        }
        out += '}';
        break;
      }
    }
  }

  [[nodiscard]] std::uint64_t replacements() const noexcept { return replacements_; }
  [[nodiscard]] std::uint64_t strings_changed() const noexcept { return strings_changed_; }

 private:
  /// `text` with every OLD replaced, left to right and without overlaps, as
  /// Python's str.replace. (Byte-wise search is character-wise search on valid UTF-8.)
  std::string_view replaced(std::string_view text) {
    std::size_t found = text.find(old_);
    if (found == std::string_view::npos) return text;
    ++strings_changed_;
    scratch_.clear();
    std::size_t from = 0;
    for (; found != std::string_view::npos; found = text.find(old_, from)) {
      scratch_.append(text, from, found - from).append(new_);
      from = found + old_.size();
      ++replacements_;
    }
    scratch_.append(text, from);
    return scratch_;
  }

  std::string old_, new_;
  std::string scratch_;
  std::uint64_t replacements_ = 0;
  std::uint64_t strings_changed_ = 0;
};

int run(const Options& options) {
  JsonlReader reader(options.input,
                     {.bad_lines = options.skip_bad_lines ? BadLinePolicy::skip : BadLinePolicy::error});
  Rewriter rewriter(options.old_text, options.new_text);
  ProgressBar progress(reader.file_size());
  std::string line;
  write_file_atomically(options.output, [&](AtomicFile& file) {
    while (const std::optional<JsonValue> record = reader.next()) {
      line.clear();
      rewriter.append(line, *record);
      line += '\n';
      file.write(line);
      progress.update(reader.bytes_consumed(), reader.records());
    }
  });
  progress.finish(reader.bytes_consumed(), reader.records());
  fmt::print(stderr, "replaced \"{}\" with \"{}\" {} times in {} strings; wrote {} records to {}\n", options.old_text,
             options.new_text, rewriter.replacements(), rewriter.strings_changed(), reader.records(),
             options.output.string());
  if (reader.blank_lines() > 0) fmt::print(stderr, "left out {} blank lines\n", reader.blank_lines());
  if (reader.bad_lines().count() > 0) {
    fmt::print(stderr, "{}\n", reader.bad_lines().summary());
    for (const SkippedLine& skipped : reader.bad_lines().first()) fmt::print(stderr, "  {}\n", skipped.message);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse_options(argc, argv);
  try {
    return run(options);
  } catch (const std::exception& e) {
    fmt::print(stderr, "qlora-change_script: {}\n", e.what());
    return 1;
  }
}
