// write_loss_curve_svg: the loss-curve picture of a run — train loss as a line,
// eval loss as dots joined by a dashed line, axes with ticks and labels, a
// legend and a title.
//
// Why SVG: it is text, so it needs no image library (no libpng, no fonts to
// rasterise), any browser or image viewer shows it, it stays sharp when
// zoomed, and a test can check it by reading it. The picture is rewritten
// atomically (io/atomic_file.hpp) so that a viewer or a kill never sees half of it.
//
// The axes span exactly the data (the smallest and largest finite step and
// loss), so the curves touch the edges of the plot box; ticks fall on round
// values (1, 2 or 5 times a power of ten) inside that span. Points whose step
// or loss is NaN or infinite are skipped (a diverged step must not flatten the
// rest of the curve into a line).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include <qlora/io/atomic_file.hpp>

namespace qlora {

/// One point of a curve: the loss at an optimizer step.
struct CurvePoint {
  double step = 0;
  double loss = 0;
};

struct LossCurveOptions {
  std::string title = "Loss";
  int width = 800;   ///< pixels
  int height = 480;  ///< pixels
};

namespace detail {

/// Where the plot box lies in the picture (pixels from the top-left corner).
struct PlotBox {
  double left = 0, top = 0, right = 0, bottom = 0;
};

/// The plot box of a picture of `width` x `height`: margins leave room for the
/// title, tick labels and axis labels.
inline PlotBox plot_box(int width, int height) {
  return {72.0, 44.0, static_cast<double>(width) - 24.0, static_cast<double>(height) - 56.0};
}

/// The closed range of the finite values `value_of` picks from `points`;
/// widened around a single value so that it maps to the middle of the box.
struct Range {
  double low = 0, high = 1;
  [[nodiscard]] double fraction(double value) const { return (value - low) / (high - low); }
};

template <class Pick>
Range finite_range(std::span<const CurvePoint> train, std::span<const CurvePoint> eval, Pick value_of) {
  double low = INFINITY, high = -INFINITY;
  for (const std::span<const CurvePoint> points : {train, eval}) {
    for (const CurvePoint& p : points) {
      if (!std::isfinite(p.step) || !std::isfinite(p.loss)) continue;
      low = std::min(low, value_of(p));
      high = std::max(high, value_of(p));
    }
  }
  if (low > high) return {};
  if (low == high) {
    const double half = low == 0 ? 0.5 : std::abs(low) * 0.05;
    return {low - half, high + half};
  }
  return {low, high};
}

/// Round tick values inside `range`: multiples of 1, 2 or 5 x 10^k, about
/// `wanted` of them.
inline std::vector<double> ticks(const Range& range, int wanted) {
  const double rough = (range.high - range.low) / wanted;
  const double magnitude = std::pow(10.0, std::floor(std::log10(rough)));
  double spacing = magnitude;
  for (const double factor : {1.0, 2.0, 5.0, 10.0}) {
    spacing = factor * magnitude;
    if (spacing >= rough) break;
  }
  std::vector<double> values;
  // A tiny tolerance keeps a tick that lands on the edge up to rounding.
  const double slack = spacing * 1e-9;
  for (double k = std::ceil((range.low - slack) / spacing); k * spacing <= range.high + slack; k += 1) {
    values.push_back(k * spacing == 0 ? 0.0 : k * spacing);  // no "-0"
  }
  return values;
}

/// A number as a tick label: no trailing zeros, no exponent for ordinary sizes.
inline std::string tick_label(double value) { return fmt::format("{:.6g}", value); }

inline std::string xml_escaped(std::string_view text) {
  std::string out;
  for (const char c : text) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

/// The SVG text of the picture.
inline std::string loss_curve_svg(std::span<const CurvePoint> train, std::span<const CurvePoint> eval,
                                  const LossCurveOptions& options) {
  const PlotBox box = plot_box(options.width, options.height);
  const Range steps = finite_range(train, eval, [](const CurvePoint& p) { return p.step; });
  const Range losses = finite_range(train, eval, [](const CurvePoint& p) { return p.loss; });
  const auto x_of = [&](double step) { return box.left + steps.fraction(step) * (box.right - box.left); };
  const auto y_of = [&](double loss) { return box.bottom - losses.fraction(loss) * (box.bottom - box.top); };
  const auto finite_points = [](std::span<const CurvePoint> points) {
    std::vector<CurvePoint> kept;
    for (const CurvePoint& p : points) {
      if (std::isfinite(p.step) && std::isfinite(p.loss)) kept.push_back(p);
    }
    return kept;
  };
  const std::vector<CurvePoint> train_kept = finite_points(train);
  const std::vector<CurvePoint> eval_kept = finite_points(eval);
  const auto polyline = [&](const std::vector<CurvePoint>& points, std::string_view id, std::string_view style) {
    std::string coordinates;
    for (const CurvePoint& p : points) coordinates += fmt::format("{}{:.2f},{:.2f}", coordinates.empty() ? "" : " ", x_of(p.step), y_of(p.loss));
    return fmt::format("<polyline id=\"{}\" fill=\"none\" {} points=\"{}\"/>\n", id, style, coordinates);
  };

  std::string svg = fmt::format(
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect width=\"{0}\" height=\"{1}\" fill=\"white\"/>\n"
      "<text x=\"{2}\" y=\"24\" text-anchor=\"middle\" font-size=\"16\">{3}</text>\n",
      options.width, options.height, options.width / 2.0, xml_escaped(options.title));
  svg += fmt::format("<rect id=\"plot-box\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"black\"/>\n",
                     box.left, box.top, box.right - box.left, box.bottom - box.top);
  svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n", (box.left + box.right) / 2,
                     box.bottom + 40);
  svg += fmt::format("<text x=\"18\" y=\"{0}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {0})\">loss</text>\n",
                     (box.top + box.bottom) / 2);
  if (train_kept.empty() && eval_kept.empty()) {
    svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"gray\">no data yet</text>\n",
                       (box.left + box.right) / 2, (box.top + box.bottom) / 2);
    return svg + "</svg>\n";
  }

  svg += "<g id=\"x-ticks\" text-anchor=\"middle\">\n";
  for (const double tick : ticks(steps, 6)) {
    const double x = x_of(tick);
    svg += fmt::format("<line x1=\"{0:.2f}\" y1=\"{1}\" x2=\"{0:.2f}\" y2=\"{2}\" stroke=\"#ddd\"/>"
                       "<text x=\"{0:.2f}\" y=\"{3}\">{4}</text>\n",
                       x, box.top, box.bottom, box.bottom + 18, tick_label(tick));
  }
  svg += "</g>\n<g id=\"y-ticks\" text-anchor=\"end\">\n";
  for (const double tick : ticks(losses, 5)) {
    const double y = y_of(tick);
    svg += fmt::format("<line x1=\"{1}\" y1=\"{0:.2f}\" x2=\"{2}\" y2=\"{0:.2f}\" stroke=\"#ddd\"/>"
                       "<text x=\"{3}\" y=\"{4:.2f}\">{5}</text>\n",
                       y, box.left, box.right, box.left - 6, y + 4, tick_label(tick));
  }
  svg += "</g>\n";

  if (!train_kept.empty()) svg += polyline(train_kept, "train", "stroke=\"#1f77b4\" stroke-width=\"1.5\"");
  if (!eval_kept.empty()) {
    svg += polyline(eval_kept, "eval", "stroke=\"#d62728\" stroke-width=\"1.5\" stroke-dasharray=\"6 4\"");
    svg += "<g id=\"eval-points\" fill=\"#d62728\">\n";
    for (const CurvePoint& p : eval_kept) svg += fmt::format("<circle cx=\"{:.2f}\" cy=\"{:.2f}\" r=\"3\"/>\n", x_of(p.step), y_of(p.loss));
    svg += "</g>\n";
  }

  // Legend, top right inside the box (losses fall, so that corner is usually free).
  const int entries = static_cast<int>(!train_kept.empty()) + static_cast<int>(!eval_kept.empty());
  svg += fmt::format("<g id=\"legend\">\n<rect x=\"{}\" y=\"{}\" width=\"108\" height=\"{}\" fill=\"white\" "
                     "fill-opacity=\"0.85\" stroke=\"#ccc\"/>\n",
                     box.right - 116, box.top + 6, 18 * entries + 4);
  double legend_y = box.top + 16;
  const auto legend_entry = [&](std::string_view label, std::string_view colour, std::string_view dash) {
    svg += fmt::format("<line x1=\"{0}\" y1=\"{1}\" x2=\"{2}\" y2=\"{1}\" stroke=\"{3}\" stroke-width=\"2\"{4}/>"
                       "<text x=\"{5}\" y=\"{6}\">{7}</text>\n",
                       box.right - 110, legend_y, box.right - 86, colour, dash, box.right - 80, legend_y + 4, label);
    legend_y += 18;
  };
  if (!train_kept.empty()) legend_entry("train loss", "#1f77b4", "");
  if (!eval_kept.empty()) legend_entry("eval loss", "#d62728", " stroke-dasharray=\"6 4\"");
  svg += "</g>\n";
  return svg + "</svg>\n";
}

}  // namespace detail

/// Writes the picture of `train` and `eval` to `path` (an .svg file),
/// atomically. Empty input gives axes and "no data yet". Throws
/// Error("InvalidArgument") for a picture smaller than 200 x 150 pixels, and
/// Error("IoError") when the file cannot be written.
inline void write_loss_curve_svg(const std::filesystem::path& path, std::span<const CurvePoint> train,
                                 std::span<const CurvePoint> eval, const LossCurveOptions& options = {}) {
  check(options.width >= 200 && options.height >= 150, "InvalidArgument",
        "loss curve {}: a {} x {} picture leaves no room for the plot; use at least 200 x 150", path.string(),
        options.width, options.height);
  const std::string svg = detail::loss_curve_svg(train, eval, options);
  write_file_atomically(path, [&](AtomicFile& file) { file.write(svg); });
}

}  // namespace qlora
