"""One engine step over the paged KV cache: the packed row of new tokens, and attention.

The serving engine runs one forward pass a step over every scheduled sequence: their new
tokens sit side by side in one row (a prompt's chunk, or one decoded token), each at its
own position. `PagedBatch` is that step's view of the PagedKVCache, handed to the model
as its `cache`: in every layer the model calls `attend` with the row's queries, keys and
values, and gets back each token's attention output, computed over its own sequence's
keys only.

Where those keys are read from (model/paged_kv_cache.py has the arrays):
- every sequence whose next token is computed this step has a slot in the *slab*: the
  decoding ones attend in one call, each over its own length (the rest is masked); a
  prompt in its last chunk, with others that start where it does, over adjacent slots
  (padded to the group's longest: `Group`);
- a prompt that goes on in the next step attends over a copy of its own, kept for then.
New rows reach the pages as the rules in `attend` say. The plan of a step (who joins or
leaves the slab, which rows move where) is made once, in its first layer (`_plan`); a
step that only moves every member one token on is planned by `next_step`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import tinygrad_lite.functional as F
from tinygrad_lite import Tensor, backend

from .packed_row import Group, Segment, buckets, column_list, columns_of, group_of, is_whole
from .paged_kv_cache import PagedKVCache, Slot, Transfer


def causal_attention(queries, keys, values, lengths=None):
    """Causal attention of arrays (g, nh, n, hs) over (g, nh, context, hs) -> (g, nh, n, hs),
    by the selected ops tier (wrapped without a copy or checks: the model's own arrays).
    With `lengths` (g ints), member i's one query attends to its first lengths[i] keys only."""
    if lengths is not None:  # ragged: each sequence over its own keys
        out = backend.xp_of(queries).empty_like(queries)
        for i, n in enumerate(lengths):
            out[i:i + 1] = causal_attention(queries[i:i + 1], keys[i:i + 1, :, :n], values[i:i + 1, :, :n])
        return out
    return F.scaled_dot_product_attention(*map(Tensor._from_array, (queries, keys, values)), causal=True).data


class PagedBatch:
    """One step's sequences, packed side by side in one row of tokens, over a PagedKVCache.

    segments: for each sequence, (sequence id, block table, start, n, limit, due): its n
    new tokens sit at positions start .. start+n-1 and follow each other in the packed
    row; `due` says they end the sequence's known tokens (its next token is computed this
    step: a decode, or a prompt's last chunk); it will never hold more than `limit`
    positions (its prompt and max_new_tokens). The model reads `positions` (N,) for its
    position embeddings and calls `attend` in each layer. The id names the sequence as
    long as its pages hold what they hold (the engine gives a readmitted sequence a new
    one).
    """

    paged = True

    def __init__(self, cache: PagedKVCache, segments: Sequence[tuple]) -> None:
        self.cache = cache
        positions, self.segments = [], []
        column = self.end = 0
        for sequence, table, start, n, limit, due in segments:
            if n == 1:  # (the common case, decoding: one token)
                positions.append(start)
            else:
                positions += range(start, start + n)
            self.segments.append(Segment(sequence, table, start, n, limit, due, column))
            column += n
            self.end = max(self.end, start + n)  # one past the furthest position
        self.positions = backend.namespace(cache.device).asarray(positions)
        self.plan = None  # what attend does in every layer (decided in the first one)
        self.order = None  # (next_step: the order of the sequences in the row, when the engine must repack it)

    def next_step(self) -> "PagedBatch | None":
        """The step after this one when every sequence of this one decodes one token (none
        joined or left, no prompt goes on in chunks): the same slab, each member one
        position further. None when some sequence of this step is not in the slab.
        Its row must hold the members' tokens in slot order: `order` lists their sequences
        when that is not this step's order (None when it is), and the engine packs it so.
        A decode step then reads its rows as slices, where a row in another order has every
        layer gather its queries, keys and values and scatter its output.
        NOTE: a running batch spends most of its steps like this; planning them afresh took
        ~20 us of a ~1 ms step (timed inside the steps of 8 sequences, 4 layers, 2-core Xeon
        VM)."""
        plan = self.plan
        if plan is None or plan.chunks:
            return None
        members = self.cache.slab.members
        after = PagedBatch.__new__(PagedBatch)
        after.cache, after.end, after.segments = self.cache, self.end + 1, None  # (only _plan reads segments)
        d = plan.decode
        if not plan.prompts and is_whole(d.columns, d.count):  # last step's members in slot order: the same row
            for member in members:
                member.length += 1
            after.positions, after.order = self.positions + 1, None
            lengths = None if d.lengths is None else tuple(n + 1 for n in d.lengths)
            after.plan = StepPlan(decode=DecodePlan(d.count, d.columns, d.slots, d.positions + 1, lengths, d.longest + 1),
                                  steady=True)
            return after
        order = [m.sequence for m in members]  # one token each, in slot order
        now = [s.sequence for s in self.segments] if self.segments is not None else None
        after.order = None if order == now else order
        after.positions = backend.namespace(self.cache.device).asarray([m.length for m in members])
        after.plan = StepPlan(decode=self._decode_plan(members, list(range(len(members)))), steady=True)
        return after

    def attend(self, layer: int, q, k, v, attention=causal_attention, rows=None):
        """q, k, v (N, nh, hs) arrays of the packed tokens -> attention output (N, nh, hs),
        or with `rows` (an index array of wanted columns: the last block's, gpt.last_block_rows)
        only those rows' (N', nh, hs).

        Every sequence whose next token is computed this step has a slot in the slab; its
        new keys and values go there, and the slab is what it attends over: the decoding
        ones in one call of the model's causal attention, each over its own length (a
        prompt in its last chunk, with others that start where it does, over adjacent slots,
        right-padded to the group's longest).
        A prompt that goes on next step attends over a copy of its own, kept for then.
        `attention` (queries, keys, values, lengths=None) -> output, arrays, is by default
        `causal_attention` (F.scaled_dot_product_attention: the selected ops tier; the lean
        step passes the fast tier's kernels themselves). Inference only: nothing here is
        recorded for a backward.

        NOTE: the slab is kept from step to step, and a decoding sequence's new rows go to
        the slab alone (a write-back cache: writing each row to its page too doubled the
        cache misses of a decode step, ~18 us per layer, 8 sequences of 264 tokens, 2-core
        Xeon VM). They reach the pages, many rows in one copy, before anyone could read
        them there: when the sequence leaves the slab, when a step reads pages (a prefix
        hit may share a page the slab has not written yet), and when the engine goes idle
        (PagedKVCache.settle); rows nobody could read there (a finished sequence's last,
        partial page; every row, without prefix caching) never do.
        NOTE: before the slab, decoding sequences shared a copy (and an attention call)
        only when their contexts were equally long: 32 requests of 32-96 prompt tokens took
        ~26 calls a layer. One masked call instead (`python bench/engine_ab.py --against
        2a77a65`, the lab's batch sweep, 7 alternating runs, 2-core AMD EPYC VM):
        max_batch_size 32 2,353 -> 3,730 tokens/s, 16 1,903 -> 2,751, 8 1,589 -> 2,143;
        8 prompts of one length: unchanged within noise.
        """
        if self.plan is None:  # (every layer does the same: what to do is decided once a step)
            self.plan = self._plan()
        plan = self.plan
        if plan.steady and rows is None:  # the common step, in short: the slab's members, a token further each
            return self._decode(layer, q, k, v, attention)  # (next_step's row is in slot order: no scatter)
        cache, slab = self.cache, self.cache.slab
        wanted = None if rows is None else {c: i for i, c in enumerate(backend.to_numpy(rows).tolist())}
        if plan.flush is not None:  # rows only the slab holds go to the pages before anyone reads them
            cache.write_pages(layer, plan.flush)
        self._arrange(layer)
        outputs = [] if plan.decode is None else [(plan.decode.columns, self._decode(layer, q, k, v, attention))]
        keys, values = slab.k[layer], slab.v[layer]
        for slots, start, group, pool_rows in plan.prompts:  # prompts in their last chunk, by start (buckets)
            k_new, v_new = k[group.columns], v[group.columns]  # (R, nh, hs)
            if pool_rows is not None:  # (prefix caching: to the pages at once)
                cache.write_rows(layer, pool_rows, k_new, v_new)
            end = start + group.n
            keys[slots, :, start:end] = group.padded(k_new)
            values[slots, :, start:end] = group.padded(v_new)
            outputs.append(self._prompt_attention(q, group, keys[slots, :, :end], values[slots, :, :end],
                                                  attention, wanted))
        kept, chunks = cache.chunks[layer], {}
        for (members, tables, group), context, pool_rows, limit in plan.chunks:  # prompts that go on next step
            k_new, v_new = k[group.columns], v[group.columns]
            cache.write_rows(layer, pool_rows, k_new, v_new)
            copy = self.grown(kept.get(members), group, context, limit, k_new, v_new) or self.gathered_afresh(
                layer, tables, context, limit)
            chunks[members] = copy
            outputs.append(self._prompt_attention(q, group, copy.keys[:, :, :context], copy.values[:, :, :context],
                                                  attention, wanted))
        cache.chunks[layer] = chunks  # only this step's prompts can go on
        outputs = [out for out in outputs if out is not None]
        if wanted is not None:
            return self._wanted_rows(outputs, wanted, q)
        if len(outputs) == 1 and is_whole(outputs[0][0], len(q)):  # one group holds the whole row, in order
            return outputs[0][1]
        y = backend.xp_of(q).empty(q.shape, dtype=q.dtype)
        for columns, out in outputs:
            y[columns] = out
        return y

    def _decode(self, layer: int, q, k, v, attention):
        """The decoding members' new rows into their slots, and their attention in one call,
        each over its own length: (S, nh, hs), in slot order."""
        d, slab = self.plan.decode, self.cache.slab
        keys, values = slab.k[layer], slab.v[layer]
        keys[d.slots, :, d.positions] = k[d.columns]  # (each at its own position when they differ)
        values[d.slots, :, d.positions] = v[d.columns]
        out = attention(q[d.columns][:, :, None], keys[:d.count, :, :d.longest], values[:d.count, :, :d.longest],
                        d.lengths)  # (S, nh, 1, hs)
        return out[:, :, 0]

    def _prompt_attention(self, q, group: Group, keys, values, attention, wanted):
        """The causal attention of a group of prompts' new tokens over their keys and values
        (g, nh, context, hs), each member's new positions ending at context - (n - its
        length): (columns, (R, nh, hs)). With `wanted`, only what the wanted rows need: the
        engine wants each prompt's last token (its next token's logits), so just those
        queries attend, each over its own keys (None if no row of the group is wanted: a
        prompt's first chunks, whose keys and values are the point)."""
        if wanted is not None:
            here = set(column_list(group.columns)).intersection(wanted)  # (set operations: hundreds of columns)
            if not here:
                return None
            last = group.last_columns()
            if here.issubset(last):
                columns = columns_of(last, self.cache.device)
                ends = None if group.where is None else tuple(keys.shape[2] - group.n + n for n in group.lengths)
                return columns, attention(q[columns][:, :, None], keys, values, ends)[:, :, 0]
        out = attention(group.padded(q[group.columns]), keys, values)  # (g, nh, n, hs)
        return group.columns, group.unpadded(out)

    @staticmethod
    def _wanted_rows(outputs: list, wanted: dict, q):
        """(N', nh, hs): the groups' outputs (columns, (g n, nh, hs)) at the wanted rows, in
        their order."""
        y = backend.xp_of(q).empty((len(wanted),) + q.shape[1:], dtype=q.dtype)
        for columns, out in outputs:
            picked = [(wanted[c], i) for i, c in enumerate(column_list(columns)) if c in wanted]
            if picked:
                to, at = zip(*picked)
                y[list(to)] = out[list(at)]
        return y

    def _plan(self) -> "StepPlan":
        """What attend does in every layer of this step, and the slab's bookkeeping for it,
        decided once (in the first layer):
        1. rows only the slab holds go to their pages: a leaving member's (it gives its slot
           up), and every member's when someone reads pages this step (a request whose
           prompt starts with a page a member filled while decoding shares that page); only
           those someone could read there (PagedKVCache.worth_writing);
        2. the last members move into the slots of those that left: members fill slots
           0 .. M-1;
        3. the sequences whose next token is computed and that have no slot yet take the
           next ones (the slab grows first if they do not fit): one that decodes gathers its
           keys and values so far from its pages; a prompt in its last chunk, with others
           that start where it does (packed_row.buckets), takes adjacent slots (and gathers
           what a prefix hit or earlier chunks computed).
        The decoding members are then slots 0 .. S-1. A prompt that goes on next step is
        not in the slab: it attends over a copy of its own (grown or gathered_afresh)."""
        cache, slab, page = self.cache, self.cache.slab, self.cache.page_size
        old, due = slab.members, {s.sequence for s in self.segments if s.due}
        index = {m.sequence: i for i, m in enumerate(old)}
        reading = any(s.start > 0 and s.sequence not in index for s in self.segments)  # (gathers from pages)
        spans = []
        for i, m in enumerate(old):
            if m.written < m.length and (reading or m.sequence not in due):
                spans.append((i, m.table, m.written, m.length))
                m.written = m.length
        flush = cache.transfer(cache.worth_writing(spans))
        survivors = sum(m.sequence in due for m in old)
        holes = [i for i in range(survivors) if old[i].sequence not in due]
        movers = [i for i in range(survivors, len(old)) if old[i].sequence in due]
        moves = [(src, dst, old[src].length) for src, dst in zip(movers, holes)]
        members = old[:survivors]
        for src, dst, _ in moves:
            members[dst] = old[src]
        longest = max((m.length for m in members), default=0)
        gathers, decoding, prompts, chunks = [], [], {}, {}
        for s in self.segments:
            if not s.due:  # a prompt going on next step: a copy of its own, alike ones together
                chunks.setdefault((s.n, s.start + s.n), []).append(s)
            elif s.n > 1:  # a prompt in its last chunk: with others from the same start
                prompts.setdefault(s.start, []).append(s)
            else:
                if s.sequence not in index:  # joins: its keys and values so far come from its pages
                    gathers.append((len(members), s.table, 0, s.start))
                    members.append(Slot(s.sequence, s.table, s.start, s.start, s.limit))
                decoding.append(s)
        columns = {s.sequence: s.column for s in decoding}
        decode = self._decode_plan(members, [columns[m.sequence] for m in members]) if decoding else None
        prompt_plans = []
        at_once = cache.prefix_caching  # a prompt's rows to its pages now, too (PagedKVCache.prefix_caching)
        for start, alike in prompts.items():
            for bucket in buckets(alike, start):
                first = len(members)
                gathers += [(first + j, s.table, 0, start) for j, s in enumerate(bucket)]
                members += [Slot(s.sequence, s.table, start + s.n, start + s.n if at_once else start, s.limit)
                            for s in bucket]
                rows = cache.slots([s.table for s in bucket], start, [start + s.n for s in bucket]) if at_once else None
                prompt_plans.append((slice(first, first + len(bucket)), start, group_of(bucket, cache.device), rows))
        room = -(-max((m.limit for m in members), default=0) // page) * page
        regrow = None
        if len(members) > slab.capacity or room > slab.room:  # (it never shrinks: at most max_batch_size slots)
            regrow = (max(len(members), slab.capacity), max(room, slab.room), survivors, longest)
        slab.members = members
        chunk_plans = []
        for (n, end), group in chunks.items():
            tables = [s.table for s in group]
            chunk_plans.append(((tuple(s.sequence for s in group), tables, group_of(group, cache.device)), end,
                                cache.slots(tables, end - n, [end] * len(tables)), max(s.limit for s in group)))
        return StepPlan(flush, moves, regrow, cache.transfer(gathers), decode, prompt_plans, chunk_plans)

    def _decode_plan(self, members: list, columns: list[int]) -> "DecodePlan":
        """The decoding members (slots 0 .. S-1, one new token each at their length, which
        this moves on by one) and their packed columns, slot by slot."""
        count = len(columns)
        positions = [m.length for m in members[:count]]
        for m in members[:count]:
            m.length += 1
        xp = backend.namespace(self.cache.device)
        cols = columns_of(columns, self.cache.device)
        if min(positions) == max(positions):  # alike: one position, and every key of the slab is theirs
            return DecodePlan(count, cols, slice(0, count), positions[0], None, positions[0] + 1)
        return DecodePlan(count, cols, xp.arange(count), xp.asarray(positions), tuple(p + 1 for p in positions),
                          max(positions) + 1)

    def _arrange(self, layer: int) -> None:
        """This layer's slab as the plan wants it: members moved into the slots of those that
        left, a bigger slab if needed, joiners' rows gathered from their pages."""
        plan, cache, slab = self.plan, self.cache, self.cache.slab
        keys, values = slab.k[layer], slab.v[layer]
        for src, dst, length in plan.moves:
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]
        if plan.regrow is not None:
            capacity, room, survivors, longest = plan.regrow
            shape, dtype = (capacity, cache.n_head, room, cache.head_size), cache.k[layer].dtype
            xp = backend.namespace(cache.device)
            grown = [xp.zeros(shape, dtype=dtype) for _ in range(2)]  # (zeros: finite rows past every length)
            for new, now in zip(grown, (keys, values)):
                if survivors:
                    new[:survivors, :, :longest] = now[:survivors, :, :longest]
            slab.k[layer], slab.v[layer] = grown
        if plan.join is not None:
            cache.read_pages(layer, plan.join)

    def grown(self, kept: "Gathered | None", group: Group, context: int, limit: int, k_new,
              v_new) -> "Gathered | None":
        """The prompt group's copy with its n new rows each (g n, nh, hs) added: last step's,
        if it goes on to `context` positions (a chunk after the one before), or a new one if
        these rows are its whole context (a fresh prompt: nothing to gather); else None."""
        n = group.n  # (a chunk group's members are alike)
        if n == context:
            kept = self.empty_copy(len(group.lengths), context, limit)
        elif not _can_grow(kept, context, n):
            return None
        kept.keys[:, :, context - n:context] = group.padded(k_new)  # (g, nh, n, hs)
        kept.values[:, :, context - n:context] = group.padded(v_new)
        kept.context = context
        return kept

    def empty_copy(self, g: int, context: int, limit: int) -> "Gathered":
        """Room for g prompts' keys and values up to `context` positions and some chunks
        beyond (at most to `limit`, the most they will hold), holding none yet."""
        pool, page = self.cache.k[0], self.cache.page_size
        room = -(-min(limit, context + 8 * page) // page) * page  # capacity for the next chunks too
        keys, values = (backend.xp_of(pool).empty((g, self.cache.n_head, room, self.cache.head_size),
                                                  dtype=pool.dtype) for _ in range(2))
        return Gathered(0, keys, values)

    def gathered_afresh(self, layer: int, tables, context: int, limit: int) -> "Gathered":
        """A prompt group's keys and values gathered from its pages (which hold all of them),
        with room to grow for the next chunks."""
        group = self.empty_copy(len(tables), context, limit)
        group.keys[:, :, :context] = self.gather(self.cache.k[layer], tables, context)
        group.values[:, :, :context] = self.gather(self.cache.v[layer], tables, context)
        group.context = context
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
    """A prompt group's keys and values, contiguous per head, kept for its next chunk."""

    __slots__ = ("context", "keys", "values")

    def __init__(self, context: int, keys, values) -> None:
        self.context = context  # positions they hold
        self.keys, self.values = keys, values  # (g, nh, room, hs), room >= context


class DecodePlan(NamedTuple):
    """The decoding members of a step: slots 0 .. count-1, their columns in the packed row
    (slot by slot), where their new rows go (slots, positions: a slice and one position
    when their lengths are alike), their lengths after it (None when alike) and the
    longest."""

    count: int
    columns: Any
    slots: Any
    positions: Any
    lengths: tuple | None
    longest: int


class StepPlan(NamedTuple):
    """What PagedBatch.attend does in every layer of one step (PagedBatch._plan)."""

    flush: Transfer | None = None  # slab rows to their pages, first
    moves: list = []  # (from slot, to slot, length): members into the slots of those that left
    regrow: tuple | None = None  # (capacity, room, members kept, their longest length): a bigger slab
    join: Transfer | None = None  # pages' rows into the slots of sequences joining the slab
    decode: DecodePlan | None = None  # the decoding members: one attention call
    prompts: list = []  # (slots, start, Group, pool rows): prompts in their last chunk, by start and length
    chunks: list = []  # ((members, tables, Group), end, pool rows, limit): prompts going on next step
    steady: bool = False  # last step's members, one token further each, and nothing else (next_step)


def _can_grow(kept: "Gathered | None", context: int, n: int = 1) -> bool:
    """Does last step's copy of a prompt group go on to `context` positions with n new ones?"""
    return kept is not None and kept.context == context - n and kept.keys.shape[2] >= context
