// write_loss_curve_svg: the picture is well-formed XML-ish SVG (every tag
// closed, in order), the curves' coordinates map the data's step and loss
// ranges onto the plot box (values worked out by hand below), ticks fall on
// round values, non-finite points are skipped, and empty input still gives a
// picture.
#include <qlora/train/loss_curve.hpp>

#include <cmath>
#include <string>
#include <string_view>
#include <vector>

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include "io/test_support.hpp"
#include "support/errors.hpp"

using qlora::CurvePoint;
using qlora::write_loss_curve_svg;
using qlora::test::read_text;
using qlora::test::require_error;
using qlora::test::TempDir;

namespace {

/// Checks that every element is closed, in order, and that the document is
/// one <svg> element after the XML declaration. Returns the problem, or "".
std::string structure_problem(std::string_view svg) {
  if (!svg.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg ")) return "no XML declaration + <svg>";
  std::vector<std::string> open;
  std::size_t roots = 0;
  for (std::size_t pos = svg.find('<'); pos != std::string_view::npos; pos = svg.find('<', pos + 1)) {
    const std::size_t end = svg.find('>', pos);
    if (end == std::string_view::npos) return "unterminated tag";
    const std::string_view tag = svg.substr(pos + 1, end - pos - 1);
    if (tag.starts_with("?")) continue;
    if (tag.find('<') != std::string_view::npos) return "'<' inside a tag";
    if (tag.starts_with("/")) {
      if (open.empty() || open.back() != tag.substr(1)) return "mismatched </" + std::string(tag.substr(1)) + ">";
      open.pop_back();
      continue;
    }
    if (open.empty()) ++roots;
    if (!tag.ends_with("/")) open.emplace_back(tag.substr(0, tag.find_first_of(" \n")));
  }
  if (!open.empty()) return "unclosed <" + open.back() + ">";
  if (roots != 1) return "more than one root element";
  if (!svg.ends_with("</svg>\n")) return "does not end with </svg>";
  return "";
}

/// The value of `attribute` in the first element whose text contains `marker`.
std::string attribute(std::string_view svg, std::string_view marker, std::string_view name) {
  const std::size_t element = svg.rfind('<', svg.find(marker));
  const std::size_t end = svg.find('>', element);
  const std::string key = fmt::format(" {}=\"", name);
  const std::size_t start = svg.find(key, element);
  REQUIRE(start < end);
  const std::size_t value = start + key.size();
  return std::string(svg.substr(value, svg.find('"', value) - value));
}

std::string written(const std::vector<CurvePoint>& train, const std::vector<CurvePoint>& eval,
                    const qlora::LossCurveOptions& options = {}) {
  TempDir dir;
  write_loss_curve_svg(dir / "loss.svg", train, eval, options);
  return read_text(dir / "loss.svg");
}

}  // namespace

TEST_CASE("the curves map the data ranges onto the plot box") {
  const double nan = std::nan("");
  const std::vector<CurvePoint> train = {{0, 4.0}, {50, 2.0}, {60, nan}, {70, INFINITY}, {nan, 3.0}, {100, 1.0}};
  const std::vector<CurvePoint> eval = {{50, 2.5}, {100, 1.5}};
  const std::string svg = written(train, eval);
  INFO(svg);
  CHECK(structure_problem(svg).empty());
  // 800 x 480 picture; box from x 72 to 776 (704 wide), y 44 to 424 (380 high).
  CHECK(attribute(svg, "id=\"plot-box\"", "x") == "72");
  CHECK(attribute(svg, "id=\"plot-box\"", "y") == "44");
  CHECK(attribute(svg, "id=\"plot-box\"", "width") == "704");
  CHECK(attribute(svg, "id=\"plot-box\"", "height") == "380");
  // Steps 0..100 across, losses 1..4 up: (0, 4) is the top-left corner,
  // (100, 1) the bottom-right; loss 2 is a third of the way up (424 - 380/3),
  // 2.5 halfway, 1.5 a sixth. The NaN and Inf points are not there.
  CHECK(attribute(svg, "id=\"train\"", "points") == "72.00,44.00 424.00,297.33 776.00,424.00");
  CHECK(attribute(svg, "id=\"eval\"", "points") == "424.00,234.00 776.00,360.67");
  CHECK(svg.find("<circle cx=\"424.00\" cy=\"234.00\" r=\"3\"/>") != std::string::npos);
  CHECK(svg.find("<circle cx=\"776.00\" cy=\"360.67\" r=\"3\"/>") != std::string::npos);
}

TEST_CASE("ticks fall on round values with labels; title, axis labels and legend are there") {
  const std::string svg = written({{0, 4.0}, {100, 1.0}}, {{100, 1.5}}, {.title = "phi-2 <QLoRA> & co"});
  INFO(svg);
  CHECK(structure_problem(svg).empty());
  // Steps 0..100, about 6 ticks: every 20. Losses 1..4, about 5 ticks: every 1.
  const std::string x_ticks = svg.substr(svg.find("id=\"x-ticks\""), svg.find("id=\"y-ticks\"") - svg.find("id=\"x-ticks\""));
  for (const char* label : {">0<", ">20<", ">40<", ">60<", ">80<", ">100<"}) CHECK(x_ticks.find(label) != std::string::npos);
  std::size_t grid_lines = 0;
  for (std::size_t pos = x_ticks.find("<line"); pos != std::string::npos; pos = x_ticks.find("<line", pos + 1)) ++grid_lines;
  CHECK(grid_lines == 6);
  CHECK(svg.find("<text x=\"66\" y=\"428.00\">1</text>") != std::string::npos);  // loss 1 at the bottom edge
  CHECK(svg.find("<text x=\"66\" y=\"48.00\">4</text>") != std::string::npos);   // loss 4 at the top edge
  CHECK(svg.find(">phi-2 &lt;QLoRA&gt; &amp; co</text>") != std::string::npos);
  CHECK(svg.find(">step</text>") != std::string::npos);
  CHECK(svg.find(">loss</text>") != std::string::npos);
  CHECK(svg.find(">train loss</text>") != std::string::npos);
  CHECK(svg.find(">eval loss</text>") != std::string::npos);
}

TEST_CASE("fractional tick spacing is labelled without rounding noise") {
  const std::string svg = written({{1, 0.3}, {2, 0.1}}, {});
  // Losses 0.1..0.3, about 5 ticks: every 0.05 (0.1 * 0.5), labelled exactly.
  for (const char* label : {">0.1<", ">0.15<", ">0.2<", ">0.25<", ">0.3<"}) {
    INFO(label);
    CHECK(svg.find(label) != std::string::npos);
  }
  CHECK(svg.find("0000000") == std::string::npos);
}

TEST_CASE("only train points: no eval curve or legend entry") {
  const std::string svg = written({{1, 2.0}, {2, 1.0}}, {});
  CHECK(structure_problem(svg).empty());
  CHECK(svg.find("id=\"train\"") != std::string::npos);
  CHECK(svg.find("id=\"eval\"") == std::string::npos);
  CHECK(svg.find("eval loss") == std::string::npos);
}

TEST_CASE("a single point is drawn in the middle of the box") {
  const std::string svg = written({{5, 2.0}}, {});
  CHECK(structure_problem(svg).empty());
  CHECK(attribute(svg, "id=\"train\"", "points") == "424.00,234.00");
}

TEST_CASE("no finite point gives axes and a note, still a valid picture") {
  for (const auto& train : {std::vector<CurvePoint>{}, std::vector<CurvePoint>{{1, std::nan("")}}}) {
    const std::string svg = written(train, {});
    INFO(svg);
    CHECK(structure_problem(svg).empty());
    CHECK(svg.find("no data yet") != std::string::npos);
    CHECK(svg.find("<polyline") == std::string::npos);
    CHECK(svg.find("id=\"plot-box\"") != std::string::npos);
  }
}

TEST_CASE("the picture replaces the previous one; bad sizes and paths are named errors") {
  TempDir dir;
  qlora::test::write_bytes(dir / "loss.svg", "old");
  write_loss_curve_svg(dir / "loss.svg", std::vector<CurvePoint>{{1, 1.0}}, {});
  CHECK(read_text(dir / "loss.svg").starts_with("<?xml"));
  CHECK(dir.listing() == std::vector<std::string>{"loss.svg"});  // no temporary file left
  require_error([&] { write_loss_curve_svg(dir / "small.svg", {}, {}, {.width = 100}); }, "InvalidArgument",
                "small.svg", "100 x 480");
  require_error([&] { write_loss_curve_svg(dir / "missing" / "loss.svg", {}, {}); }, "IoError", "missing");
}
