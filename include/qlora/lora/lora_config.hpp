// LoraConfig: the hyper-parameters of a LoRA adapter, with PEFT's meaning and
// defaults (peft.LoraConfig), and PEFT's rules for which modules a config
// targets and which rank/alpha each one gets.
//
// The names follow PEFT's adapter_config.json so that a config read from a
// PEFT file and one built in C++ are the same object (lora/adapter_config.hpp
// does the JSON). Only what changes the maths or the file layout lives here.
#pragma once

#include <qlora/core/error.hpp>

#include <cmath>
#include <cstdint>
#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace qlora {

/// How A is initialised (B is always zero): PEFT's `init_lora_weights`.
enum class LoraInit : std::uint8_t {
  kaiming_uniform,  ///< `true`, PEFT's default: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_ with a = sqrt(5))
  gaussian,         ///< `"gaussian"`: A ~ N(0, (1/r)^2), as in the XTuner tutorial's configs
};

/// Which base-layer biases train with the adapter: PEFT's `bias`.
enum class LoraBias : std::uint8_t {
  none,       ///< every base parameter frozen (default)
  all,        ///< every bias of the model trains and is saved
  lora_only,  ///< only the biases of LoRA-wrapped layers train (saved as `<module>.base_layer.bias`)
};

constexpr std::string_view lora_bias_name(LoraBias bias) noexcept {
  switch (bias) {
    case LoraBias::all: return "all";
    case LoraBias::lora_only: return "lora_only";
    case LoraBias::none: break;
  }
  return "none";
}

inline LoraBias parse_lora_bias(std::string_view name) {
  if (name == "none") return LoraBias::none;
  if (name == "all") return LoraBias::all;
  if (name == "lora_only") return LoraBias::lora_only;
  throw Error("InvalidLoraConfig", fmt::format("bias \"{}\": expected \"none\", \"all\" or \"lora_only\"", name));
}

struct LoraConfig {
  int r = 8;                  ///< rank; > 0 and <= min(in_features, out_features) of every target
  double lora_alpha = 8.0;    ///< scaling numerator; > 0
  double lora_dropout = 0.0;  ///< dropout probability on the adapter branch input, in [0, 1)
  bool use_rslora = false;    ///< scaling = alpha / sqrt(r) instead of alpha / r
  LoraInit init = LoraInit::kaiming_uniform;
  LoraBias bias = LoraBias::none;
  /// Module names: a module path matches `t` when it equals t or ends with "." + t.
  std::vector<std::string> target_modules;
  /// Instead of the list, one regular expression that must match the whole path (PEFT's string form).
  std::optional<std::string> target_modules_regex;
  /// Modules trained in full and saved whole (e.g. "lm_head", "embed_tokens"); never LoRA-wrapped.
  std::vector<std::string> modules_to_save;
  /// Per-module overrides, in file order: key k (a regex) applies to path n when n
  /// matches "(.*\.)?(k)$"; the first matching key wins, as in PEFT's get_pattern_key.
  std::vector<std::pair<std::string, int>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;

  /// Throws InvalidLoraConfig unless r, alpha, dropout and the patterns are usable.
  void validate() const {
    check(r > 0, "InvalidLoraConfig", "r = {}: the LoRA rank must be > 0", r);
    check(std::isfinite(lora_alpha) && lora_alpha > 0, "InvalidLoraConfig", "lora_alpha = {}: expected a finite value > 0",
          lora_alpha);
    check(lora_dropout >= 0 && lora_dropout < 1, "InvalidLoraConfig", "lora_dropout = {}: expected 0 <= p < 1",
          lora_dropout);
    for (const auto& [key, rank] : rank_pattern) {
      check(rank > 0, "InvalidLoraConfig", "rank_pattern[\"{}\"] = {}: the LoRA rank must be > 0", key, rank);
    }
    for (const auto& [key, alpha] : alpha_pattern) {
      check(std::isfinite(alpha) && alpha > 0, "InvalidLoraConfig", "alpha_pattern[\"{}\"] = {}: expected a value > 0",
            key, alpha);
    }
    // Patterns are regular expressions: one that does not compile is a config error, not a std::regex_error later.
    const auto compiles = [](std::string_view field, const std::string& pattern) {
      try {
        (void)std::regex(pattern);
      } catch (const std::regex_error& e) {
        throw Error("InvalidLoraConfig", fmt::format("{} \"{}\" is not a valid regular expression: {}", field, pattern, e.what()));
      }
    };
    if (target_modules_regex) compiles("target_modules", *target_modules_regex);
    for (const auto& entry : rank_pattern) compiles("rank_pattern key", entry.first);
    for (const auto& entry : alpha_pattern) compiles("alpha_pattern key", entry.first);
  }

  /// Whether PEFT would wrap the module at `path` with LoRA.
  [[nodiscard]] bool targets(std::string_view path) const {
    if (is_module_to_save(path)) return false;
    if (target_modules_regex) return std::regex_match(path.begin(), path.end(), std::regex(*target_modules_regex));
    for (const auto& name : target_modules) {
      if (path == name || (path.size() > name.size() && path.ends_with(name) &&
                           path[path.size() - name.size() - 1] == '.')) {
        return true;
      }
    }
    return false;
  }

  /// Whether `path` is (inside) a module listed in modules_to_save: PEFT's "(^|.*\.)name($|\..*)".
  [[nodiscard]] bool is_module_to_save(std::string_view path) const {
    for (const auto& name : modules_to_save) {
      const std::regex rule("(^|.*\\.)" + escape_regex(name) + "($|\\..*)");
      if (std::regex_match(path.begin(), path.end(), rule)) return true;
    }
    return false;
  }

  /// The rank of the adapter on `path` (rank_pattern, else r).
  [[nodiscard]] int rank_for(std::string_view path) const { return pattern_value(rank_pattern, path).value_or(r); }
  /// The alpha of the adapter on `path` (alpha_pattern, else lora_alpha).
  [[nodiscard]] double alpha_for(std::string_view path) const {
    return pattern_value(alpha_pattern, path).value_or(lora_alpha);
  }

  /// alpha/r (alpha/sqrt(r) with rsLoRA) for `path`, rounded once to float as
  /// torch does when it multiplies a float tensor by the Python scalar.
  [[nodiscard]] float scaling_for(std::string_view path) const {
    const double rank = rank_for(path);
    return static_cast<float>(alpha_for(path) / (use_rslora ? std::sqrt(rank) : rank));
  }

  /// Throws InvalidLoraConfig unless an adapter for `path` fits a layer of
  /// in_features -> out_features (0 < r <= min(in, out)).
  void validate_for(std::string_view path, std::int64_t in_features, std::int64_t out_features) const {
    validate();
    const int rank = rank_for(path);
    check(in_features > 0 && out_features > 0, "InvalidLoraConfig", "module {}: in_features {} and out_features {} must be > 0",
          path, in_features, out_features);
    check(rank <= std::min(in_features, out_features), "InvalidLoraConfig",
          "module {}: r = {} exceeds min(in_features {}, out_features {})", path, rank, in_features, out_features);
  }

 private:
  static std::string escape_regex(std::string_view text) {
    std::string escaped;
    for (const char c : text) {
      if (std::string_view("\\^$.|?*+()[]{}").find(c) != std::string_view::npos) escaped += '\\';
      escaped += c;
    }
    return escaped;
  }

  template <class V>
  static std::optional<V> pattern_value(const std::vector<std::pair<std::string, V>>& patterns, std::string_view path) {
    for (const auto& [key, value] : patterns) {
      if (std::regex_match(path.begin(), path.end(), std::regex("(.*\\.)?(" + key + ")$"))) return value;
    }
    return std::nullopt;
  }
};

}  // namespace qlora
