// AdapterConfig against files the real peft wrote (tests/reference/peft_adapter.py):
// a peft-written adapter_config.json reads as peft means it and re-writes to the
// same bytes; our config for the fixture adapter is the committed qlora file;
// PEFT's defaults, feature refusals and error reports for bad files.
#include <qlora/lora/adapter_config.hpp>

#include <algorithm>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>

#include "io/test_support.hpp"
#include "lora/adapter_test_support.hpp"
#include "lora/tiny_phi_adapter.hpp"

using qlora::AdapterConfig;
using qlora::adapter_config_json;
using qlora::LoraBias;
using qlora::LoraInit;
using qlora::parse_adapter_config;
using qlora::test::lora_fixture;
using qlora::test::read_text;
using qlora::test::require_error;
using Strings = std::vector<std::string>;

namespace {

constexpr std::string_view file = "dir/adapter_config.json";

AdapterConfig parse(std::string_view text) { return parse_adapter_config(text, file); }

/// The text of a config holding peft_type "LORA" and `fields` (JSON members, comma-separated).
std::string lora_with(std::string_view fields) {
  if (fields.empty()) return R"({"peft_type": "LORA"})";
  return fmt::format(R"({{"peft_type": "LORA", {}}})", fields);
}

std::string extra_field(const AdapterConfig& config, std::string_view name) {
  for (const auto& [key, text] : config.extra_fields) {
    if (key == name) return text;
  }
  return "<absent>";
}

Strings sorted(Strings list) {
  std::sort(list.begin(), list.end());
  return list;
}

}  // namespace

TEST_CASE("a config peft wrote reads as peft means it") {
  const AdapterConfig config = qlora::read_adapter_config(lora_fixture("peft_written/adapter_config.json"));
  CHECK(config.lora.r == 4);
  CHECK(config.lora.lora_alpha == 8.0);
  CHECK(config.lora.lora_dropout == 0.0);
  CHECK_FALSE(config.lora.use_rslora);
  CHECK(config.lora.init == LoraInit::kaiming_uniform);
  CHECK_FALSE(config.foreign_init);
  CHECK(config.lora.bias == LoraBias::none);
  CHECK(sorted(config.lora.target_modules) == sorted(qlora::test::tiny_phi_adapter_config().lora.target_modules));
  CHECK_FALSE(config.lora.target_modules_regex);
  CHECK(config.lora.modules_to_save == Strings{"lm_head"});
  CHECK(config.lora.rank_pattern.empty());
  CHECK(config.lora.alpha_pattern.empty());
  CHECK(config.task_type == "CAUSAL_LM");
  CHECK(config.base_model_name_or_path.empty());  // null: the model was built from a config
  CHECK_FALSE(config.revision);
  CHECK(config.inference_mode);
  // The peft that wrote the fixtures is the one whose format we reproduce.
  CHECK(config.peft_version == qlora::peft_format_version);
  // Fields carried as they are: peft's own that we do not interpret.
  CHECK(extra_field(config, "megatron_core") == R"("megatron.core")");
  CHECK(extra_field(config, "loftq_config") == "{}");
  CHECK(extra_field(config, "auto_mapping") == "null");
  CHECK(extra_field(config, "qalora_group_size") == "16");
  CHECK(config.lora.targets("model.layers.1.mlp.fc2"));
  CHECK_FALSE(config.lora.targets("lm_head"));
}

TEST_CASE("re-writing a peft-written config gives peft's bytes back") {
  const std::string text = read_text(lora_fixture("peft_written/adapter_config.json"));
  CHECK(adapter_config_json(parse(text)) == text);
}

TEST_CASE("our config of the fixture adapter is the committed qlora_written file") {
  // tests/reference/peft_adapter.py checked that peft loads that file without a
  // warning and re-saves it unchanged; this keeps the writer tied to it.
  CHECK(adapter_config_json(qlora::test::tiny_phi_adapter_config()) ==
        read_text(lora_fixture("qlora_written/adapter_config.json")));
  CHECK(parse(adapter_config_json(qlora::test::tiny_phi_adapter_config())).peft_version ==
        qlora::default_peft_version());
}

TEST_CASE("fields a file leaves out take PEFT's defaults") {
  const AdapterConfig config = parse(R"({"peft_type": "LORA"})");
  CHECK(config.lora.r == 8);
  CHECK(config.lora.lora_alpha == 8.0);
  CHECK(config.lora.lora_dropout == 0.0);
  CHECK(config.lora.bias == LoraBias::none);
  CHECK(config.lora.init == LoraInit::kaiming_uniform);
  CHECK(config.lora.target_modules.empty());
  CHECK(config.task_type.empty());
  CHECK_FALSE(config.inference_mode);
  CHECK(config.peft_version == qlora::default_peft_version());
  CHECK(config.extra_fields.empty());
  // Written back with peft's full field set.
  const std::string text = adapter_config_json(config);
  CHECK(text.find("\"task_type\": null") != std::string::npos);
  CHECK(text.find("\"use_dora\": false") != std::string::npos);
  CHECK(text.find("\"target_modules\": null") != std::string::npos);
}

TEST_CASE("target_modules may be a regular expression") {
  const AdapterConfig config = parse(lora_with(R"j("target_modules": ".*\\.(q_proj|fc1)")j"));
  REQUIRE(config.lora.target_modules_regex);
  CHECK(config.lora.targets("model.layers.0.self_attn.q_proj"));
  CHECK_FALSE(config.lora.targets("model.layers.0.self_attn.k_proj"));
  CHECK(adapter_config_json(config).find(R"j("target_modules": ".*\\.(q_proj|fc1)")j") != std::string::npos);
  require_error([] { parse(lora_with(R"("target_modules": "all-linear")")); }, "UnsupportedAdapter", file,
                "all-linear");
  require_error([] { parse(lora_with(R"("target_modules": "q_proj(")")); }, "InvalidAdapterConfig", file,
                "target_modules");
}

TEST_CASE("rank_pattern and alpha_pattern keep file order: the first matching key wins, as in peft") {
  const AdapterConfig config = parse(lora_with(
      R"("r": 8, "rank_pattern": {"q_proj": 2, "layers.0.self_attn.q_proj": 4}, "alpha_pattern": {"fc1": 3.5})"));
  CHECK(config.lora.rank_for("model.layers.0.self_attn.q_proj") == 2);
  CHECK(config.lora.rank_for("model.layers.0.self_attn.k_proj") == 8);
  CHECK(config.lora.alpha_for("model.layers.1.mlp.fc1") == 3.5);
  // peft writes them with sorted keys, the int-typed values as integers where integral.
  const std::string text = adapter_config_json(config);
  CHECK(text.find("\"rank_pattern\": {\n    \"layers.0.self_attn.q_proj\": 4,\n    \"q_proj\": 2\n  }") !=
        std::string::npos);
  CHECK(text.find("\"alpha_pattern\": {\n    \"fc1\": 3.5\n  }") != std::string::npos);
  require_error([] { parse(lora_with(R"("rank_pattern": {"q_proj": 2.5})")); }, "InvalidAdapterConfig", file,
                "rank_pattern[\"q_proj\"]", "an integer");
  require_error([] { parse(lora_with(R"("rank_pattern": {"(": 2})")); }, "InvalidAdapterConfig", file,
                "rank_pattern[\"(\"]");
}

TEST_CASE("init_lora_weights: true and \"gaussian\" initialise; other inits load but refuse a fresh adapter") {
  CHECK(parse(lora_with(R"("init_lora_weights": true)")).lora.init == LoraInit::kaiming_uniform);
  const AdapterConfig gaussian = parse(lora_with(R"("init_lora_weights": "gaussian")"));
  CHECK(gaussian.lora.init == LoraInit::gaussian);
  CHECK_NOTHROW(gaussian.check_can_initialise());
  CHECK(adapter_config_json(gaussian).find(R"("init_lora_weights": "gaussian")") != std::string::npos);
  for (const std::string_view value : {"false", R"("pissa")", R"("pissa_niter_4")", R"("loftq")", R"("olora")"}) {
    INFO("init_lora_weights = " << value);
    const AdapterConfig config = parse(lora_with(fmt::format(R"("init_lora_weights": {})", value)));
    REQUIRE(config.foreign_init);
    CHECK(*config.foreign_init == value);
    require_error([&] { config.check_can_initialise(); }, "UnsupportedAdapter", value);
    CHECK(adapter_config_json(config).find(fmt::format(R"("init_lora_weights": {})", value)) != std::string::npos);
  }
  require_error([] { parse(lora_with(R"("init_lora_weights": 1)")); }, "InvalidAdapterConfig", file,
                "init_lora_weights");
}

TEST_CASE("a field that turns on a feature qlora lacks is refused, naming the field and the file") {
  const std::vector<std::pair<std::string_view, std::string_view>> active = {
      {"use_dora", "true"},
      {"fan_in_fan_out", "true"},
      {"lora_bias", "true"},
      {"layers_to_transform", "[0]"},
      {"layers_pattern", R"("layers")"},
      {"layer_replication", "[[0, 1]]"},
      {"megatron_config", R"({"tensor_parallel_size": 2})"},
      {"alora_invocation_tokens", "[1, 2]"},
      {"use_qalora", "true"},
      {"exclude_modules", R"(["fc2"])"},
      {"trainable_token_indices", "[0, 1]"},
      {"target_parameters", R"(["experts.down_proj"])"},
  };
  for (const auto& field : active) {
    INFO(field.first << " = " << field.second);
    require_error([&] { parse(lora_with(fmt::format(R"("{}": {})", field.first, field.second))); },
                  "UnsupportedAdapter", file, field.first);
  }
  // Inactive values are peft's defaults.
  const AdapterConfig config = parse(lora_with(R"("use_dora": false, "fan_in_fan_out": false, "exclude_modules": [], )"
                                               R"("megatron_config": null, "lora_bias": false)"));
  CHECK(config.extra_fields.empty());
}

TEST_CASE("peft_type must be LORA") {
  require_error([] { parse(R"({"peft_type": "IA3", "r": 8})"); }, "UnsupportedAdapter", file, "IA3");
  require_error([] { parse(R"({"r": 8})"); }, "InvalidAdapterConfig", file, "peft_type");
  require_error([] { parse(R"({"peft_type": 1})"); }, "InvalidAdapterConfig", file, "peft_type", "a string");
}

TEST_CASE("malformed JSON is reported with the file and the position") {
  require_error([] { parse("{\"peft_type\": \"LORA\",\n  \"r\": }"); }, "InvalidAdapterConfig", file, "line 2");
  require_error([] { parse(R"(["peft_type", "LORA"])"); }, "InvalidAdapterConfig", file, "a JSON object");
  require_error([] { parse(R"({"peft_type": "LORA", "r": 4, "r": 8})"); }, "DuplicateKey", file, "`r`");
}

TEST_CASE("a field of the wrong type names the file, the field and what was expected") {
  struct Case {
    std::string_view fields, field, expected;
  };
  for (const Case& c : {Case{R"("r": "8")", "\"r\"", "an integer"},
                        Case{R"("r": 4.0)", "\"r\"", "an integer"},
                        Case{R"("lora_alpha": "16")", "\"lora_alpha\"", "a number"},
                        Case{R"("lora_dropout": null)", "\"lora_dropout\"", "a number"},
                        Case{R"("use_rslora": 1)", "\"use_rslora\"", "true or false"},
                        Case{R"("bias": "some")", "\"bias\"", "\"lora_only\""},
                        Case{R"("target_modules": ["q_proj", 3])", "\"target_modules\"", "a list of strings"},
                        Case{R"("modules_to_save": "lm_head")", "\"modules_to_save\"", "a list of strings"},
                        Case{R"("rank_pattern": [])", "\"rank_pattern\"", "an object"},
                        Case{R"("base_model_name_or_path": 7)", "\"base_model_name_or_path\"", "a string"},
                        Case{R"("task_type": "causal_lm")", "\"task_type\"", "CAUSAL_LM"}}) {
    INFO(c.fields);
    require_error([&] { parse(lora_with(c.fields)); }, "InvalidAdapterConfig", file, c.field, c.expected);
  }
  // Values PEFT would only trip over later.
  require_error([] { parse(lora_with(R"("r": 0)")); }, "InvalidAdapterConfig", file, "r = 0");
  require_error([] { parse(lora_with(R"("lora_dropout": 1.0)")); }, "InvalidAdapterConfig", file, "lora_dropout");
}

TEST_CASE("unknown fields (a newer peft) survive a round trip, spelled as Python spells them") {
  const AdapterConfig config =
      parse(lora_with(R"("brand_new": {"b": [1, 2.5, "\u00e9", 1e-05, 100.0], "a": null}, "runtime_config": {})"));
  REQUIRE(config.extra_fields.size() == 1);  // runtime_config: dropped, as peft drops it
  CHECK(config.extra_fields[0].first == "brand_new");
  const std::string text = adapter_config_json(config);
  CHECK(text.find("  \"brand_new\": {\n    \"a\": null,\n    \"b\": [\n      1,\n      2.5,\n      \"\\u00e9\",\n"
                  "      1e-05,\n      100.0\n    ]\n  },\n") != std::string::npos);
  CHECK(text.find("runtime_config") == std::string::npos);
  CHECK(adapter_config_json(parse(text)) == text);

  AdapterConfig clash;
  clash.extra_fields = {{"r", "16"}};
  require_error([&] { (void)adapter_config_json(clash); }, "InvalidAdapterConfig", "\"r\"");
}

TEST_CASE("numbers are spelled as Python's json.dumps spells them") {
  // Expected strings: Python's repr() of the same doubles.
  const std::vector<std::pair<double, std::string_view>> cases = {
      {0.0, "0.0"},       {-0.0, "-0.0"},         {1.0, "1.0"},           {0.05, "0.05"},
      {0.1, "0.1"},       {1e-4, "0.0001"},       {1e-5, "1e-05"},        {0.00012345, "0.00012345"},
      {1e15, "1000000000000000.0"}, {1e16, "1e+16"}, {1.2345678901234568e+17, "1.2345678901234568e+17"},
      {5e-324, "5e-324"}, {1.0 / 3.0, "0.3333333333333333"}, {9999999999999998.0, "9999999999999998.0"},
  };
  for (const auto& [value, python] : cases) {
    std::string text;
    qlora::detail::append_python_float(text, value);
    CHECK(text == python);
  }
  AdapterConfig config;
  config.lora.lora_alpha = 16;
  config.lora.lora_dropout = 0.05;
  const std::string text = adapter_config_json(config);
  CHECK(text.find("\"lora_alpha\": 16,") != std::string::npos);
  CHECK(text.find("\"lora_dropout\": 0.05,") != std::string::npos);
  config.lora.lora_alpha = 16.5;
  CHECK(adapter_config_json(config).find("\"lora_alpha\": 16.5,") != std::string::npos);
}

TEST_CASE("configs peft wrote for the other fields read as meant and re-write to peft's bytes") {
  const qlora::test::Json fixture = qlora::test::load_json(lora_fixture("peft_config_variants.json"));
  std::map<std::string, AdapterConfig> configs;
  for (const qlora::test::Json& variant : fixture["variants"]) {
    const auto name = variant["name"].get<std::string>();
    const auto text = variant["text"].get<std::string>();
    INFO("variant " << name << ": LoraConfig(**" << variant["kwargs"].dump() << ")");
    const AdapterConfig config = parse(text);
    CHECK(adapter_config_json(config) == text);
    configs.emplace(name, config);
  }
  REQUIRE(configs.size() == 7);

  const AdapterConfig& patterns = configs.at("rslora_patterns");
  CHECK(patterns.lora.use_rslora);
  CHECK(patterns.lora.bias == LoraBias::lora_only);
  CHECK(patterns.lora.lora_dropout == 0.05);
  CHECK(patterns.lora.rank_for("model.layers.0.self_attn.v_proj") == 4);
  CHECK(patterns.lora.rank_for("model.layers.1.self_attn.v_proj") == 16);
  CHECK(patterns.lora.rank_for("model.layers.1.self_attn.q_proj") == 8);
  CHECK(patterns.lora.alpha_for("model.layers.1.self_attn.v_proj") == 12.5);
  CHECK(patterns.lora.scaling_for("model.layers.1.self_attn.v_proj") == static_cast<float>(12.5 / 4.0));
  CHECK(patterns.base_model_name_or_path == "microsoft/phi-2");
  CHECK(patterns.revision == std::optional<std::string>("main"));

  const AdapterConfig& regex = configs.at("gaussian_regex");
  CHECK(regex.lora.init == LoraInit::gaussian);
  CHECK(regex.lora.targets("model.layers.3.mlp.fc1"));
  CHECK_FALSE(regex.lora.targets("model.layers.3.mlp.fc2"));
  CHECK(regex.lora.modules_to_save == Strings{"lm_head", "model.embed_tokens"});

  CHECK(configs.at("pissa").foreign_init == std::optional<std::string>(R"("pissa_niter_4")"));
  CHECK(configs.at("no_init").foreign_init == std::optional<std::string>("false"));
  CHECK(configs.at("eva").foreign_init == std::optional<std::string>(R"("eva")"));
  CHECK(extra_field(configs.at("eva"), "eva_config").find(R"("rho":2.0)") != std::string::npos);
  CHECK(configs.at("non_ascii").base_model_name_or_path ==
        "\xC3\xBCser/mod\xC3\xA8le-\xE6\xA8\xA1\xE5\x9E\x8B-\xF0\x9F\x98\x80");  // üser/modèle-模型-😀
  CHECK(configs.at("defaults").task_type.empty());
}
