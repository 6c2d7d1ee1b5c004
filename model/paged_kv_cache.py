"""The paged KV cache: many sequences' keys and values in one pool of fixed-size pages.

generate() gives every row its own contiguous buffer of block_size positions
(model/kv_cache.py). A server does not know how long each request will run, and
reserving the whole context for each would fill memory with empty rows. So, like an
operating system's virtual memory (vLLM's PagedAttention), the keys and values live in
one pool of pages of `page_size` tokens each, shaped (num_blocks, page_size, n_head,
head_size) per layer. A sequence takes pages as it grows and lists them in its *block
table*: its token t lives in page table[t // page_size], row t % page_size. Pages need
not be adjacent, and a finished sequence's pages go straight back to the pool.

Prefix caching: a page full of tokens is known by a key chained from the keys before it,
key_i = hash(key_(i-1), tokens of page i), so a key names the whole prefix up to the end
of its page. Two requests that start with the same system prompt compute the same keys,
and the second one reuses the first one's pages (a reference count says how many
sequences hold each page) instead of computing their keys and values again. A hash can
collide, so a hit is confirmed against the tokens stored with the page.

`PagePool` does the bookkeeping (which page is free, who holds it, which prefix it
holds); `PagedKVCache` owns the arrays; `PagedBatch` is one engine step's view of it,
handed to the model as its `cache`: it stores each new token's keys and values in its
page and runs attention for every sequence of the step over its own pages.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple, Sequence

import tinygrad_lite.functional as F
from tinygrad_lite import Tensor, backend


def page_key(previous_key: int | None, tokens: Sequence[int]) -> int:
    """The key of a full page: its tokens, chained to the key of the page before it."""
    return hash((previous_key, tuple(tokens)))


class PagePool:
    """Which of num_blocks pages are free, who holds each one, and what prefix each holds.

    A page whose last holder lets go goes back to the free list but keeps its prefix
    key: until the page is handed out again, a later request with that prefix can still
    revive it. Free pages are handed out oldest-freed first (least recently used).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.page_of: dict[int, int] = {}  # prefix key -> page
        self.key_of: dict[int, int] = {}  # page -> prefix key
        self.tokens_of: dict[int, tuple[int, ...]] = {}  # page -> its tokens (confirms a hit)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        """A free page, held once; whatever prefix it held is forgotten."""
        page, _ = self.free.popitem(last=False)
        key = self.key_of.pop(page, None)
        if key is not None:
            del self.page_of[key]
            del self.tokens_of[page]
        self.ref_counts[page] = 1
        return page

    def hold(self, page: int) -> None:
        """One more holder of a cached page (taken off the free list if nobody held it)."""
        if self.ref_counts[page] == 0:
            del self.free[page]
        self.ref_counts[page] += 1

    def release(self, page: int) -> None:
        self.ref_counts[page] -= 1
        if self.ref_counts[page] == 0:
            self.free[page] = None

    def lookup(self, key: int, tokens: Sequence[int]) -> int | None:
        """The page holding this prefix, or None (also when the hash collided)."""
        page = self.page_of.get(key)
        if page is None or self.tokens_of[page] != tuple(tokens):
            return None
        return page

    def register(self, page: int, key: int, tokens: Sequence[int]) -> None:
        """Remember that a page, now full, holds the prefix `key` (first page wins)."""
        if key not in self.page_of and page not in self.key_of:
            self.page_of[key], self.key_of[page], self.tokens_of[page] = page, key, tuple(tokens)


class PagedKVCache:
    """The pool's arrays: k[layer], v[layer] of shape (num_blocks, page_size, n_head, head_size)."""

    paged = True  # the model's attention reads `cache.paged` to pick this path

    def __init__(self, n_layer: int, num_blocks: int, page_size: int, n_head: int, head_size: int,
                 dtype="float32", device: str | None = None) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.device = device or backend.default_device()
        xp = backend.namespace(self.device)
        shape = (num_blocks, page_size, n_head, head_size)
        # NOTE: written through once now (full; empty leaves the memory untouched): the
        # pool is held for the server's life, and the first write to each 4 KB of it is a
        # page fault. Left to the steps, that cost them 0.32 ms per 512 KB of pages written
        # (0.05 ms once touched; 2-core AMD EPYC VM). A vLLM server, too, sets up its whole
        # pool at start. (Attention never reads a position before it is written: the zeros
        # are not for it.)
        self.k = [xp.full(shape, 0, dtype=dtype) for _ in range(n_layer)]
        self.v = [xp.full(shape, 0, dtype=dtype) for _ in range(n_layer)]
        self.page_size, self.n_head, self.head_size = page_size, n_head, head_size
        self.pool = PagePool(num_blocks)
        # per layer: the groups of the last step, gathered (see PagedBatch.attend)
        self.gathered: list[dict] = [{} for _ in range(n_layer)]

    def slots(self, tables, start: int, end: int):
        """The pool rows (the pages seen as one row per slot) of positions start .. end-1 of
        each table's sequence: (g (end - start),)."""
        host, page = backend.numpy, self.page_size  # (index arithmetic on the host, for any device)
        first, positions = start // page, host.arange(start, end)
        pages = host.array([table[first:(end - 1) // page + 1] for table in tables])  # (g, pages spanned)
        rows = pages[:, positions // page - first] * page + positions % page
        return backend.namespace(self.device).asarray(rows.reshape(-1))

    def write_back(self, layer: int, copy: "Gathered", slots, end: int | None = None) -> None:
        """Copy the rows that only a gathered copy holds (positions written .. end - 1,
        end = its context unless given, at these pool rows) into their pages."""
        rows, end = (-1, self.n_head, self.head_size), copy.context if end is None else end
        for pool, buffer in ((self.k[layer], copy.keys), (self.v[layer], copy.values)):
            pool.reshape(rows)[slots] = buffer[:, :, copy.written:end].transpose(0, 2, 1, 3).reshape(rows)
        copy.written = end

    def settle(self) -> None:
        """Write the gathered copies' rows that anyone could still read to the pages (the
        engine calls this when nothing runs). Nobody holds a page then, so only full
        pages, which the prefix cache may revive, are worth writing; a last partial page
        is forgotten. The copies stay until the next step replaces them.
        NOTE: dropping them here as well made the next prefill ~2 ms slower (8 x 64
        tokens, 4 layers): the allocator hands their freed memory back to the system, and
        the next copies take page faults."""
        for members, first in self.gathered[0].items():  # (every layer kept the same groups)
            end = first.context // self.page_size * self.page_size  # (the end of its last full page)
            rows = self.slots(first.tables, first.written, end) if first.written < end else None
            for layer, kept in enumerate(self.gathered):
                copy = kept[members]
                if rows is not None:
                    self.write_back(layer, copy, rows, end)
                copy.written = copy.context


def causal_attention(queries, keys, values):
    """Causal attention of arrays (g, nh, n, hs) over (g, nh, context, hs) -> (g, nh, n, hs),
    by the selected ops tier (wrapped without a copy or checks: the model's own arrays)."""
    return F.scaled_dot_product_attention(*map(Tensor._from_array, (queries, keys, values)), causal=True).data


def _as_slice(columns: list[int]) -> slice | None:
    """A run of consecutive columns as a slice (indexing by it is a view, not a copy)."""
    if columns[-1] - columns[0] == len(columns) - 1:  # (they increase: so no gap)
        return slice(columns[0], columns[0] + len(columns))
    return None


def _column_list(columns) -> list[int]:
    """A group's columns (a slice or an index array) as a list of ints."""
    if isinstance(columns, slice):
        return list(range(columns.start, columns.stop, columns.step or 1))
    return backend.to_numpy(columns).tolist()


class PagedBatch:
    """One step's sequences, packed side by side in one row of tokens, over a PagedKVCache.

    segments: for each sequence, (sequence id, block table, start, n, limit): its n new
    tokens sit at positions start .. start+n-1 and follow each other in the packed row,
    and it will never hold more than `limit` positions (its prompt and max_new_tokens). The
    model reads `positions` (N,) for its position embeddings and calls `attend` in each
    layer. The id names the sequence as long as its pages hold what they hold (the
    engine gives a readmitted sequence a new one).
    """

    paged = True

    def __init__(self, cache: PagedKVCache, segments: Sequence[tuple[Any, Sequence[int], int, int]]) -> None:
        self.cache = cache
        xp = backend.namespace(cache.device)
        positions, groups = [], {}
        column = self.end = 0
        self.limits = {}  # per group: the most positions any member will hold
        for sequence, table, start, n, limit in segments:
            end = start + n
            # sequences with as many new tokens and as long a context run as one attention call
            members, tables, columns = groups.setdefault((n, end), ([], [], []))
            self.limits[n, end] = max(limit, self.limits.get((n, end), 0))
            members.append(sequence)
            tables.append(table)  # (a gather takes the pages its context spans)
            if n == 1:  # (the common case, decoding: one token)
                positions.append(start)
                columns.append(column)
            else:
                positions += range(start, end)
                columns += range(column, column + n)
            column += n
            self.end = max(self.end, end)  # one past the furthest position
        self.positions = xp.asarray(positions)
        # (block tables stay lists until a gather needs them: a decode group seldom does)
        self.groups = {shape: (tuple(members), tables, _as_slice(columns) or xp.asarray(columns))
                       for shape, (members, tables, columns) in groups.items()}
        self.plan = None  # what attend does in every layer (decided in the first one)

    def next_step(self) -> "PagedBatch | None":
        """The step after this one when it decodes one more token for each of the same
        sequences (nothing joined or left, no new prompt): the same groups one position
        further on, and, when every copy has room for it, the same plan. None when this
        step was not such a decode step.
        NOTE: a running batch spends most of its steps like this; rebuilding the groups
        and the plan each time took ~20 us of a ~1 ms step (timed inside the steps of 8
        sequences, 4 layers, 2-core Xeon VM)."""
        plan = self.plan
        if plan is None or any(slots is not None for *_, slots in plan.groups):
            return None
        after = PagedBatch.__new__(PagedBatch)
        after.cache, after.positions, after.end = self.cache, self.positions + 1, self.end + 1
        after.groups = {(1, end + 1): group for (_, end), group in self.groups.items()}
        after.limits = {(1, end + 1): limit for (_, end), limit in self.limits.items()}
        kept = self.cache.gathered[0]
        growing = [(group, 1, context + 1, None) for group, _, context, _ in plan.groups]
        after.plan = StepPlan(growing, [], True) if all(
            _can_grow(kept.get(group[0]), context) for group, _, context, _ in growing) else None
        return after

    def attend(self, layer: int, q, k, v, attention=causal_attention, rows=None):
        """q, k, v (N, nh, hs) arrays of the packed tokens -> attention output (N, nh, hs),
        or with `rows` (an index array of wanted columns: the last block's, gpt.last_block_rows)
        only those rows' (N', nh, hs).

        Each group of alike sequences stores its new keys and values and gathers all of
        its own through its block tables; then it runs the model's causal attention on
        them: `attention` (queries, keys, values) -> output, arrays, by default
        `causal_attention` (F.scaled_dot_product_attention: the selected ops tier; the lean
        decode step passes the fast tier's kernels themselves). Inference only: nothing
        here is recorded for a backward.

        NOTE: gathering every page again at every step would copy the whole context per
        token (~85 us per layer for 8 x 264 tokens here, 15% of a decode step). So each
        group's gathered keys and values are kept for the next step, with room to grow:
        a group whose members ran together last step, n positions shorter (prefill ->
        first token -> next token ...), adds only its new rows. While such a group
        decodes, its new rows go to the gathered copy alone (a write-back cache: writing
        each row twice doubled the cache misses of a decode step, ~18 us per layer here).
        They reach the pages, many rows in one copy, before anyone could read them there:
        when the group breaks up, when a step gathers from pages (a prefix hit may share
        a page the copy has not written yet), and when the engine goes idle (settle).
        """
        cache, shape = self.cache, (-1,) + q.shape[1:]
        kept, gathered, outputs = cache.gathered[layer], {}, []
        wanted = None if rows is None else {c: i for i, c in enumerate(backend.to_numpy(rows).tolist())}
        if self.plan is None:  # (every layer kept the same groups: what to do is decided once a step)
            self.plan = self._plan(kept)
        for members, slots in self.plan.flush:  # rows only a copy holds go to the pages before anyone reads them
            cache.write_back(layer, kept[members], slots)
        for (members, tables, columns), n, context, slots in self.plan.groups:
            k_new, v_new = k[columns], v[columns]  # (g n, nh, hs)
            if slots is None:  # decoding: one new row each, into last step's copy (the pages get it later: write_back)
                group = kept[members]
                group.add_row(k_new, v_new, tables)
            else:
                cache.k[layer].reshape(shape)[slots] = k_new  # the pool seen as one row per slot: a view
                cache.v[layer].reshape(shape)[slots] = v_new
                limit = self.limits[n, context]
                group = self.grown(kept.get(members), tables, n, context, limit, k_new, v_new) or self.gathered_afresh(
                    layer, tables, context, limit)
            gathered[members] = group
            if wanted is not None:  # only some rows wanted: just the last query of each member, if those
                columns, n = self._last_queries(columns, n, wanted)
                if columns is None:
                    continue  # no row of this group is wanted (a prompt's first chunks): keys and values only
            queries = q[columns].reshape(len(tables), n, *shape[1:]).transpose(0, 2, 1, 3)  # (g, nh, n, hs)
            out = attention(queries, group.keys[:, :, :context], group.values[:, :, :context])  # (g, nh, n, hs)
            outputs.append((columns, out.transpose(0, 2, 1, 3).reshape(shape)))  # (g n, nh, hs)
        cache.gathered[layer] = gathered  # only this step's groups are worth keeping
        if wanted is not None:
            return self._wanted_rows(outputs, wanted, q)
        if len(outputs) == 1:  # one group holds the whole row, in order
            return outputs[0][1]
        y = backend.xp_of(q).empty(q.shape, dtype=q.dtype)
        for columns, out in outputs:
            y[columns] = out
        return y

    @staticmethod
    def _last_queries(columns, n: int, wanted: dict):
        """A group's columns whose queries must attend when only `wanted` rows are: (each
        member's last column, 1) when the wanted ones of the group are such (the engine wants
        a prompt's last token only: its next token's logits); (None, n) when none is; else
        (columns, n), all of them."""
        listed = _column_list(columns)
        here = set(listed).intersection(wanted)  # (set operations: a prompt brings hundreds of columns)
        if not here:
            return None, n
        if n == 1 or not here.issubset(listed[n - 1::n]):
            return columns, n
        return columns[n - 1::n] if not isinstance(columns, slice) else slice(columns.start + n - 1, columns.stop, n), 1

    @staticmethod
    def _wanted_rows(outputs: list, wanted: dict, q):
        """(N', nh, hs): the groups' outputs (columns, (g n, nh, hs)) at the wanted rows, in
        their order."""
        y = backend.xp_of(q).empty((len(wanted),) + q.shape[1:], dtype=q.dtype)
        for columns, out in outputs:
            picked = [(wanted[c], i) for i, c in enumerate(_column_list(columns)) if c in wanted]
            if picked:
                to, at = zip(*picked)
                y[list(to)] = out[list(at)]
        return y

    def decode_in_place(self, layer: int, k, v):
        """The common step, in short: when this step is steady (next_step: last step's one
        group, each sequence one row further, in the packed row's order), write the new
        keys and values k, v (N, nh, hs) into the group's copy and return its keys and
        values (N, nh, context, hs) to attend over; otherwise None (`attend` does it all).
        NOTE: the lean decode step (model/fast_decode.py) asks this first: attend's
        general bookkeeping was ~10 us a layer of a ~1.6 ms step of 8 sequences, 4 layers
        (2-core AMD EPYC VM)."""
        plan = self.plan
        if plan is None or not plan.steady or len(plan.groups) != 1:
            return None
        (members, tables, _), _, context, _ = plan.groups[0]
        copy = self.cache.gathered[layer][members]
        copy.add_row(k, v, tables)
        return copy.keys[:, :, :context], copy.values[:, :, :context]

    def _plan(self, kept: dict) -> "StepPlan":
        """Which groups decode one more row into last step's copy (the others write their
        new rows to these pool rows), and which kept copies must first write their rows
        to the pages: those of the groups that stop here, and all of them when someone
        reads pages this step (a prefix hit may share a page that a copy has not written
        yet). Read from the first layer's kept groups: every layer has the same."""
        groups = [(group, n, context, None if n == 1 and _can_grow(kept.get(group[0]), context)
                   else self.cache.slots(group[1], context - n, context)) for (n, context), group in self.groups.items()]
        decoding = {group[0] for group, _, _, slots in groups if slots is None}
        reading = len(decoding) < len(groups)
        flush = [(members, self.cache.slots(copy.tables, copy.written, copy.context)) for members, copy in kept.items()
                 if copy.written < copy.context and (reading or members not in decoding)]
        return StepPlan(groups, flush)

    def grown(self, kept: "Gathered | None", tables, n: int, context: int, limit: int, k_new,
              v_new) -> "Gathered | None":
        """The group's gathered copy with its n new rows each (g n, nh, hs) added: last
        step's, if it goes on to `context` positions (a prefill chunk after the one
        before), or a new one if these rows are its whole context (a fresh prompt: nothing
        to gather); else None."""
        if n == context:
            kept = self.empty_copy(len(tables), context, limit)
        elif not _can_grow(kept, context, n):
            return None
        g, nh, hs = len(tables), self.cache.n_head, self.cache.head_size
        for buffer, new in ((kept.keys, k_new), (kept.values, v_new)):  # (g n, nh, hs) -> (g, nh, n, hs)
            buffer[:, :, context - n:context] = new.reshape(g, n, nh, hs).transpose(0, 2, 1, 3)
        kept.context = kept.written = context  # (the pages hold the new rows too)
        kept.tables = tables
        return kept

    def empty_copy(self, g: int, context: int, limit: int) -> "Gathered":
        """Room for g sequences' keys and values up to `context` positions and some steps
        beyond (at most to `limit`, the most they will hold), holding none yet.
        NOTE: sized to the limit as generate() sizes its cache: room for 192 positions
        where 128 were all they could reach made decoding 8 x 64 + 64 tokens ~4% slower
        (the attention over the copy ~7%; 2-core Xeon VM)."""
        pool, page = self.cache.k[0], self.cache.page_size
        room = -(-min(limit, context + 8 * page) // page) * page  # capacity for the next steps too
        keys, values = (backend.xp_of(pool).empty((g, self.cache.n_head, room, self.cache.head_size),
                                                  dtype=pool.dtype) for _ in range(2))
        return Gathered(0, keys, values, None, 0)

    def gathered_afresh(self, layer: int, tables, context: int, limit: int) -> "Gathered":
        """A group's keys and values gathered from its pages (which hold all of them), with
        room to grow for the next steps."""
        group = self.empty_copy(len(tables), context, limit)
        group.keys[:, :, :context] = self.gather(self.cache.k[layer], tables, context)
        group.values[:, :, :context] = self.gather(self.cache.v[layer], tables, context)
        group.context, group.tables, group.written = context, tables, context
        return group

    def gather(self, pool, tables, context: int):
        """The first `context` keys (or values) of each table's pages: (g, nh, context, hs).
        A copy: NumPy has no matmul that reads pages where they lie."""
        xp, g, nh, hs = backend.xp_of(pool), len(tables), self.cache.n_head, self.cache.head_size
        # NOTE: take(), not pool[tables]: NumPy's fancy indexing by a 2-D index was ~20x slower
        spanned = -(-context // self.cache.page_size)  # the pages its context spans
        pages = xp.take(pool, xp.asarray([table[:spanned] for table in tables]), axis=0)  # (g, pages, page_size, nh, hs)
        return pages.reshape(g, -1, nh, hs)[:, :context].transpose(0, 2, 1, 3)


class Gathered:
    """A group's keys and values, gathered contiguous per head and kept for the next step."""

    __slots__ = ("context", "keys", "values", "tables", "written")

    def __init__(self, context: int, keys, values, tables: list, written: int) -> None:
        self.context = context  # positions they hold
        self.keys, self.values = keys, values  # (g, nh, room, hs), room >= context
        self.tables = tables  # the members' block tables (write_back finds the pages there)
        self.written = written  # positions the pages hold too (the rest wait in this copy: write_back)

    def add_row(self, k, v, tables) -> None:
        """One more position for every member: its new key and value (g, nh, hs), in this
        copy only (the pages get it later: write_back). `tables` may have a new page."""
        self.keys[:, :, self.context] = k
        self.values[:, :, self.context] = v
        self.context += 1
        self.tables = tables


class StepPlan(NamedTuple):
    """What PagedBatch.attend does in every layer of one step."""

    groups: list  # ((members, tables, columns), n, context, pool rows of the new tokens or None: decoding)
    flush: list  # (members, pool rows) of kept copies whose unwritten rows go to the pages first
    steady: bool = False  # last step's groups, each decoding one more row, and nothing else (next_step)


def _can_grow(kept: "Gathered | None", context: int, n: int = 1) -> bool:
    """Does last step's gathered group go on to `context` positions with n new ones?"""
    return kept is not None and kept.context == context - n and kept.keys.shape[2] >= context
