// Running a Python baseline script from a benchmark: which interpreter
// ($QLORA_PYTHON, else the repository's .venv/bin/python) and one run of a
// script whose last output line is a JSON object. Without an interpreter, or
// when the script fails, the caller gets the reason, never a number.
#pragma once

#include <qlora/io/detail/json.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <string>

namespace qlora::bench {

/// The interpreter for baselines, or nullopt when there is none.
inline std::optional<std::string> python_path() {
  if (const char* configured = std::getenv("QLORA_PYTHON")) return std::string(configured);
  const std::filesystem::path venv = std::filesystem::path(QLORA_SOURCE_DIR) / ".venv/bin/python";
  if (std::filesystem::exists(venv)) return venv.string();
  return std::nullopt;
}

/// Runs `python script arguments` (arguments already quoted for the shell);
/// the JSON object its output ends with, or nullopt with `error` set to the
/// tail of its output.
inline std::optional<detail::Json> run_python_json(const std::string& python, const std::filesystem::path& script,
                                                   const std::string& arguments, std::string& error) {
  const std::string command = "'" + python + "' '" + script.string() + "' " + arguments + " 2>&1";
  std::FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) {
    error = "cannot start " + python;
    return std::nullopt;
  }
  std::string output = "\n";  // so that a JSON first line also follows a newline
  char buffer[4096];
  while (const std::size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, n);
  const int status = pclose(pipe);
  const std::size_t last_line = output.rfind("\n{");
  if (status != 0 || last_line == std::string::npos) {
    error = script.filename().string() + " failed: " + output.substr(output.size() > 1500 ? output.size() - 1500 : 0);
    return std::nullopt;
  }
  return detail::Json::parse(output.substr(last_line + 1));
}

}  // namespace qlora::bench
