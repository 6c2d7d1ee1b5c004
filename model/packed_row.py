"""The packed row of one engine step: whose tokens sit in which columns, and how
sequences are grouped for one attention call.

The serving engine feeds the model one row of tokens a step (model/serving.py): each
scheduled sequence's new tokens side by side, a `Segment` each. Attention must still see
each sequence apart, so model/paged_batch.py runs it by groups: a `Group` names its
members' columns, and pads ragged members to the longest (right-padding is free under a
causal mask: a real query never sees a key after it). `buckets` chooses the groups of
prompts that start together.
"""
from __future__ import annotations

import itertools
from typing import Any, NamedTuple

from tinygrad_lite import backend


class Segment(NamedTuple):
    """One sequence's part of a step: its n new tokens at positions start .. start+n-1,
    in columns column .. column+n-1 of the packed row; `due` when they end its known
    tokens (its next token is computed); it never holds more than `limit` positions."""

    sequence: Any
    table: list
    start: int
    n: int
    limit: int
    due: bool
    column: int


def columns_of(columns: list[int], device: str):
    """Columns of the packed row to index by: a slice when they run consecutively upwards
    (indexing by it is a view, not a copy), else an index array on the device."""
    if columns == list(range(columns[0], columns[0] + len(columns))):
        return slice(columns[0], columns[0] + len(columns))
    return backend.namespace(device).asarray(columns)


def is_whole(columns, n: int) -> bool:
    """Are these columns (a slice or an index array) all n columns of the row, in order?"""
    return isinstance(columns, slice) and columns.start == 0 and columns.stop == n and columns.step in (None, 1)


def column_list(columns) -> list[int]:
    """A group's columns (a slice or an index array) as a list of ints."""
    if isinstance(columns, slice):
        return list(range(columns.start, columns.stop, columns.step or 1))
    return backend.to_numpy(columns).tolist()


class Group(NamedTuple):
    """Sequences whose new tokens attend in one call: member i's lengths[i] tokens sit in
    `columns` of the packed row (a slice or an index array), member by member. Ragged
    members are right-padded to the longest, n: under a causal mask a real query never
    sees a padded key (padding comes after every real position), and padded queries are
    dropped. `where` is None when the lengths are alike, else each packed token's (member,
    offset) in the padded (g, n) grid, as two index arrays."""

    columns: Any
    lengths: tuple
    where: Any

    @property
    def n(self) -> int:
        return max(self.lengths)

    def padded(self, rows):
        """rows (R, nh, hs), packed -> (g, nh, n, hs), zeros where padded."""
        if self.where is None:  # (a view when the columns were a slice)
            return rows.reshape(len(self.lengths), self.n, *rows.shape[1:]).transpose(0, 2, 1, 3)
        out = backend.xp_of(rows).zeros((len(self.lengths), self.n) + rows.shape[1:], dtype=rows.dtype)
        out[self.where] = rows
        return out.transpose(0, 2, 1, 3)

    def unpadded(self, out):
        """out (g, nh, n, hs) -> the real rows (R, nh, hs), packed."""
        out = out.transpose(0, 2, 1, 3)
        return out.reshape(-1, *out.shape[2:]) if self.where is None else out[self.where]

    def last_columns(self) -> list[int]:
        """Each member's last column."""
        listed, ends = column_list(self.columns), itertools.accumulate(self.lengths)
        return [listed[end - 1] for end in ends]


def group_of(segments: list, device: str) -> Group:
    """The Group of these segments, in this order."""
    lengths = tuple(s.n for s in segments)
    columns = columns_of([c for s in segments for c in range(s.column, s.column + s.n)], device)
    if len(set(lengths)) == 1:
        return Group(columns, lengths, None)
    host, xp = backend.numpy, backend.namespace(device)
    member = host.repeat(host.arange(len(lengths)), lengths)
    offset = host.concatenate([host.arange(n) for n in lengths])
    return Group(columns, lengths, (xp.asarray(member), xp.asarray(offset)))


PAD_PAIRS = 32768  # padded (query, key) pairs a prompt group may compute to save an attention call


def buckets(segments: list, start: int) -> list[list]:
    """Prompts whose new tokens all start at `start`, in groups for one causal attention
    call each: by length, a prompt joins the group of the shorter ones before it while
    padding the group to its length adds at most PAD_PAIRS (query, key) pairs. Alike
    lengths pad nothing.
    NOTE: a call costs ~0.1-0.2 ms before any work (2-core AMD EPYC VM), and prompts that
    arrive together rarely share a length: 32 prompts of 32-96 tokens made 26 calls a
    layer. The step that prefills them (1,995 tokens, 4 x 128 model), alternating runs,
    PAD_PAIRS 0 / 2,048 / 8,192 / 32,768 / 131,072 / no limit: 26 / 6 / 3 / 2 / 1 / 1 groups,
    66.1 / 56.3 / 55.0 / 49.6 / 59.5 / 57.9 ms; 32 prompts of 4-40 tokens 33.6 -> 26.7 ms
    (one group), 16 of 100-400 86.5 -> 72.5 ms (three).
    """
    ordered = sorted(segments, key=lambda s: s.n)
    groups = [[ordered[0]]]
    for s in ordered[1:]:
        group = groups[-1]
        padding = sum((s.n - b.n) * (start + (s.n + b.n) / 2) for b in group)  # the rows it adds, times their keys
        if padding <= PAD_PAIRS:
            group.append(s)
        else:
            groups.append([s])
    # each group in the row's order: its members take slots in that order, and a slab in the
    # row's order lets every later decode step index the row by a slice, not gather it
    return [sorted(group, key=lambda s: s.column) for group in groups]
