"""Packing conversations into rows of `seq_length` training positions (plain python).

A conversation of L tokens gives L - 1 (token, label) positions, so a row of `seq_length`
positions holds conversations whose L - 1 sum to at most `seq_length` (a conversation of
`seq_length + 1` tokens fills one alone, as in an unpacked sample). `first_fit` places each
conversation, in stream order, into the first of the last `window` open rows with room; a row
leaves the window when it is full or when a conversation fits none of the open rows and the
window is full (the oldest leaves). Rows are emitted in that order, so the first k rows depend
only on the stream, not on how many rows are asked for: a run that asks for more later sees the
same ones first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

# open rows a conversation may go to: on the bundled sample within 2.1 points of an unbounded
# first fit (seq_length 256-1024, file order or a shuffled epoch), at a bounded cost per
# conversation
PACK_WINDOW = 8


def positions(length: int, seq_length: int) -> int:
    """Training positions of a conversation of `length` tokens, truncated to seq_length + 1."""
    return max(min(length, seq_length + 1) - 1, 0)


def first_fit(lengths: Iterable[int], seq_length: int, *, rows: Optional[int] = None,
              window: int = PACK_WINDOW) -> list[list[int]]:
    """Rows of indices into `lengths` (positions per item, each <= seq_length; items of 0 are
    skipped). `rows`: stop after that many (`lengths` may then be endless); otherwise every
    item is placed and the open rows close at the end, oldest first."""
    out: list[list[int]] = []
    open_rows: list[list] = []  # [used, [items]]
    for i, n in enumerate(lengths):
        if rows is not None and len(out) >= rows:
            break
        if n <= 0:
            continue
        if n > seq_length:
            raise ValueError(f"item {i}: {n} positions exceed seq_length={seq_length}")
        row = next((r for r in open_rows if r[0] + n <= seq_length), None)
        if row is None:
            if len(open_rows) == window:
                out.append(open_rows.pop(0)[1])
            row = [0, []]
            open_rows.append(row)
        row[0] += n
        row[1].append(i)
        if row[0] == seq_length:
            open_rows.remove(row)
            out.append(row[1])
    else:
        out.extend(r[1] for r in open_rows)
    return out[:rows] if rows is not None else out


@dataclass(frozen=True)
class PackingEfficiency:
    """Real training positions against row slots: packed, and one conversation per row padded
    to the longest conversation or to seq_length (what unpacked samples are)."""

    seq_length: int
    conversations: int
    tokens: int  # real (token, label) positions
    rows: int  # packed rows
    longest: int  # positions of the longest conversation

    @property
    def packed(self) -> float:
        return self.tokens / max(self.rows * self.seq_length, 1)

    @property
    def padded_to_longest(self) -> float:
        return self.tokens / max(self.conversations * self.longest, 1)

    @property
    def padded_to_seq_length(self) -> float:
        return self.tokens / max(self.conversations * self.seq_length, 1)

    def describe(self) -> str:
        return (f"{self.rows} rows of {self.seq_length} for {self.conversations} "
                f"conversations, {self.packed:.1%} real tokens "
                f"({self.tokens} of {self.rows * self.seq_length}); one per row "
                f"{self.padded_to_longest:.1%} padded to the longest ({self.longest}), "
                f"{self.padded_to_seq_length:.1%} padded to {self.seq_length}")


def packing_efficiency(lengths: Sequence[int], seq_length: int) -> PackingEfficiency:
    """`lengths`: conversations' token counts, in order; each is truncated to seq_length + 1
    and packed by `first_fit`, as the packed chat dataset does."""
    pos = [positions(int(n), seq_length) for n in lengths]
    pos = [n for n in pos if n > 0]
    return PackingEfficiency(seq_length=seq_length, conversations=len(pos), tokens=sum(pos),
                             rows=len(first_fit(pos, seq_length)), longest=max(pos, default=0))
