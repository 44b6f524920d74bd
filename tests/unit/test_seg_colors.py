"""SEG segment colours: every nodule its own colour, however many there are."""

from __future__ import annotations

from pipelines.seg import SEGMENT_COLORS_RGB, segment_color


def test_the_first_segments_keep_the_chosen_colours_and_no_two_of_forty_share_one() -> None:
    colours = [segment_color(n) for n in range(1, 41)]
    assert colours[: len(SEGMENT_COLORS_RGB)] == list(SEGMENT_COLORS_RGB)
    assert len(set(colours)) == 40
    assert all(0 <= c <= 255 for rgb in colours for c in rgb)
