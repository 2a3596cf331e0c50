"""Cutting an output range at ragged input ends, and over threads."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from snapstore.coding import _ragged as ragged


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 100), max_size=8),
    start=st.integers(0, 100),
    span=st.integers(0, 100),
)
def test_segments_tile_the_range_and_name_exactly_the_live_inputs(
    lengths: list[int], start: int, span: int
) -> None:
    stop = start + span
    pieces = ragged.segments(lengths, start, stop)
    covered = [(a, b) for a, b, _ in pieces]
    assert covered == sorted(covered)
    assert all(a < b for a, b in covered) or span == 0
    assert sum(b - a for a, b in covered) == span
    if pieces:
        assert pieces[0][0] == start and pieces[-1][1] == stop
    for a, b, live in pieces:
        for byte in (a, b - 1):
            # Input i has data at this byte exactly when it is listed as live.
            assert live == tuple(i for i, n in enumerate(lengths) if n > byte)


@given(length=st.integers(0, 1 << 30), parts=st.integers(1, 16))
def test_split_range_tiles_with_aligned_pieces(length: int, parts: int) -> None:
    pieces = ragged.split_range(length, parts)
    assert pieces[0][0] == 0 and pieces[-1][1] == length
    assert all(b0 == a1 for (_, b0), (a1, _) in itertools.pairwise(pieces))
    assert len(pieces) <= max(1, min(parts, length // ragged.MIN_SPLIT_BYTES))
    assert all(a % 4096 == 0 for a, _ in pieces)


def test_run_split_reraises_a_piece_error_after_all_pieces_finish() -> None:
    done: list[int] = []

    def work(a: int, b: int) -> None:
        done.append(a)
        if a == 0:
            raise ValueError("boom")

    try:
        ragged.run_split(work, 3 * ragged.MIN_SPLIT_BYTES, threads=3)
    except ValueError as exc:
        assert str(exc) == "boom"
    else:
        raise AssertionError("expected the piece's error")
    assert len(done) == 3
