// TemplateSegments: segments keep their text, kind and flag in order; a text
// segment built from pieces is one segment; the counts of dropped and joined
// messages add up; clear() empties it (counts included) for reuse.
#include <qlora/data/template_segment.hpp>

#include <catch2/catch.hpp>

using qlora::SegmentKind;
using qlora::TemplateSegments;

TEST_CASE("segments keep their order, kind, flag and text") {
  TemplateSegments segments;
  segments.add_bos();
  segments.begin_text(false);
  segments.append("<|im_start|>user\n");
  segments.append("Hi");
  segments.add_text("Hello<|im_end|>", true);
  segments.add_eos(true);
  segments.add_text("", false);

  REQUIRE(segments.size() == 5);
  CHECK(segments[0].kind == SegmentKind::bos);
  CHECK_FALSE(segments[0].supervised);
  CHECK(segments[0].text.empty());
  CHECK(segments[1].kind == SegmentKind::text);
  CHECK_FALSE(segments[1].supervised);
  CHECK(segments[1].text == "<|im_start|>user\nHi");
  CHECK(segments[2].supervised);
  CHECK(segments[2].text == "Hello<|im_end|>");
  CHECK(segments[3].kind == SegmentKind::eos);
  CHECK(segments[3].supervised);
  CHECK(segments[4].kind == SegmentKind::text);
  CHECK(segments[4].text.empty());
}

TEST_CASE("clear empties the buffer for the next conversation") {
  TemplateSegments segments;
  segments.add_text("first conversation", true);
  segments.count_cuts(2, 1);
  segments.count_cuts(1, 0);
  CHECK(segments.dropped_messages() == 3);
  CHECK(segments.joined_messages() == 1);
  segments.clear();
  CHECK(segments.empty());
  CHECK(segments.dropped_messages() == 0);
  CHECK(segments.joined_messages() == 0);
  segments.add_text("second", false);
  REQUIRE(segments.size() == 1);
  CHECK(segments[0].text == "second");
  CHECK_FALSE(segments[0].supervised);
}
