"""How the positions of a channel axis map to channel sets (the analysis's symbolic layouts)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Layout", "Piece"]

Piece = tuple[int, int, int]  # (channel_set, channels, inner)


@dataclass(frozen=True)
class Layout:
    """How a slot's positions map to channel sets: a concatenation of segments, each ``outer`` repeats of
    its pieces in order (several segments only where reshaped parts are concatenated: GPT-2's packed
    q/k/v split into heads x head size).

    Each piece is ``(channel_set, channels, inner)``: ``channels`` channels of ``channel_set``, each spanning
    ``inner`` consecutive positions.
    """

    segments: tuple[tuple[int, tuple[Piece, ...]], ...]

    @staticmethod
    def of(outer: int, pieces: tuple[Piece, ...]) -> Layout:
        return Layout(((outer, tuple(pieces)),))

    @property
    def pieces(self) -> tuple[Piece, ...]:
        """Every piece, segment after segment."""
        return tuple(p for _, pieces in self.segments for p in pieces)

    def width(self, new_channels: Mapping[int, int] | None = None) -> int:
        """The number of positions, with ``new_channels[a]`` more channels of each channel set ``a``."""
        new = new_channels or {}
        return sum(outer * sum((n + new.get(a, 0)) * inner for a, n, inner in ps) for outer, ps in self.segments)

    @property
    def size(self) -> int:
        return self.width()

    def channel_sets(self) -> list[int]:
        return [a for a, _, _ in self.pieces]

    @property
    def plain(self) -> bool:
        """One channel set, one position per channel, no repeats (what streams and head sizes grow along)."""
        return self.segments == ((1, self.pieces),) and len(self.pieces) == 1 and self.pieces[0][2] == 1
