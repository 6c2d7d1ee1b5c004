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
holds); `PagedKVCache` owns the arrays: the pool, and the *slab* that attention reads
(NumPy has no matmul that reads keys where they lie, scattered over pages, so every
sequence whose next token is being computed keeps its keys and values contiguous per
head in a slot of the slab; the pages get them back before anyone reads them there).
One engine step's view of it, which runs the attention: model/paged_batch.py.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple, Sequence

from tinygrad_lite import backend


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
    """The pool's arrays, k[layer], v[layer] of shape (num_blocks, page_size, n_head,
    head_size), and the working copies attention reads from (model/paged_batch.py): the
    slab of the sequences whose next token is being computed, and the copies of prompts
    whose prefill goes on in the next step."""

    paged = True  # the model's attention reads `cache.paged` to pick this path

    def __init__(self, n_layer: int, num_blocks: int, page_size: int, n_head: int, head_size: int,
                 dtype="float32", device: str | None = None, prefix_caching: bool = True) -> None:
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
        # with prefix caching a prompt's rows go to its pages at once (the next request may
        # share them); without, they stay in the slab until someone could read them there
        self.prefix_caching = prefix_caching
        self.slab = Slab(n_layer)
        self.chunks: list[dict] = [{} for _ in range(n_layer)]  # per layer: prompts to be continued, by members

    def pool_rows(self, table: Sequence[int], start: int, end: int):
        """The pool rows (the pages seen as one row per slot) of positions start .. end-1 of
        the sequence with this block table: a host array (end - start,)."""
        host, page = backend.numpy, self.page_size  # (index arithmetic on the host, for any device)
        positions = host.arange(start, end)
        return host.asarray(table)[positions // page] * page + positions % page

    def slots(self, tables, start: int, ends: Sequence[int]):
        """The pool rows of positions start .. ends[i]-1 of each table's sequence, one after
        the other: (sum(ends) - g start,)."""
        rows = [self.pool_rows(table, start, end) for table, end in zip(tables, ends)]
        return backend.namespace(self.device).asarray(backend.numpy.concatenate(rows))

    def transfer(self, spans) -> "Transfer | None":
        """Rows to move between the slab and the pages: spans (slot, block table, start, end)
        -> each row's slot, position and pool row (None when the spans hold no row)."""
        host, xp = backend.numpy, backend.namespace(self.device)
        spans = [span for span in spans if span[3] > span[2]]
        if not spans:
            return None
        slots = host.concatenate([host.full(end - start, slot) for slot, _, start, end in spans])
        positions = host.concatenate([host.arange(start, end) for _, _, start, end in spans])
        rows = host.concatenate([self.pool_rows(table, start, end) for _, table, start, end in spans])
        return Transfer(xp.asarray(slots), xp.asarray(positions), xp.asarray(rows))

    def write_rows(self, layer: int, pool_rows, keys, values) -> None:
        """Store keys and values (R, nh, hs) at these pool rows (the pool seen as one row per
        slot: a view)."""
        shape = (-1, self.n_head, self.head_size)
        self.k[layer].reshape(shape)[pool_rows] = keys
        self.v[layer].reshape(shape)[pool_rows] = values

    def write_pages(self, layer: int, rows: "Transfer") -> None:
        """Copy these rows of the slab into their pages."""
        at = rows.slots, slice(None), rows.positions  # (R, nh, hs) of the slab
        self.write_rows(layer, rows.pool_rows, self.slab.k[layer][at], self.slab.v[layer][at])

    def read_pages(self, layer: int, rows: "Transfer") -> None:
        """Copy these rows from their pages into the slab."""
        shape = (-1, self.n_head, self.head_size)
        for pool, slab in ((self.k[layer], self.slab.k[layer]), (self.v[layer], self.slab.v[layer])):
            slab[rows.slots, :, rows.positions] = pool.reshape(shape)[rows.pool_rows]

    def worth_writing(self, spans) -> list:
        """The parts of spans (slot, block table, start, end) of slab rows whose pages someone
        could still read: a page a sequence holds, or a freed one the prefix cache can revive.
        A freed page that holds no prefix (a finished sequence's last, partial page; any page
        when prefix caching is off) is read by nobody again: its rows are not worth a copy."""
        pool, page, kept = self.pool, self.page_size, []
        for slot, table, start, end in spans:
            low = None  # the start of the run of worthwhile pages being collected
            for first in range(start - start % page, end, page):  # each page the span touches
                number = table[first // page]
                if pool.ref_counts[number] or number in pool.key_of:
                    low = max(start, first) if low is None else low
                elif low is not None:
                    kept.append((slot, table, low, first))
                    low = None
            if low is not None:
                kept.append((slot, table, low, end))
        return kept

    def settle(self) -> None:
        """Nothing runs (the engine calls this when it goes idle): write the slab's rows that
        anyone could still read to the pages (worth_writing: nobody holds a page then, so
        only full pages the prefix cache may revive), and empty the slab. (Its arrays stay,
        for the next requests.)"""
        members = self.slab.members
        rows = self.transfer(self.worth_writing([(i, m.table, m.written, m.length) for i, m in enumerate(members)]))
        if rows is not None:
            for layer in range(len(self.k)):
                self.write_pages(layer, rows)
        self.slab.members = []


class Slot:
    """A sequence's place in the slab: its block table, the positions the slab holds
    (length), how many of those its pages hold too (written), and the most it will hold."""

    __slots__ = ("sequence", "table", "length", "written", "limit")

    def __init__(self, sequence: Any, table: list, length: int, written: int, limit: int) -> None:
        self.sequence, self.table, self.length, self.written, self.limit = sequence, table, length, written, limit


class Slab:
    """The keys and values of every sequence whose next token is being computed (each
    decoding sequence, and a prompt in its last chunk), one slot each: k[layer], v[layer]
    of shape (capacity, n_head, room, head_size), slot i holding members[i]'s first
    members[i].length positions, contiguous per head. One array for all of them lets one
    attention call serve every decoding sequence, whatever its length (the positions past
    each one's length are masked out). Rows past a length hold finite numbers (zeros, or
    older rows), so that the mask's zero weights stay zeros."""

    def __init__(self, n_layer: int) -> None:
        self.k: list = [None] * n_layer
        self.v: list = [None] * n_layer
        self.members: list[Slot] = []

    @property
    def capacity(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[0]

    @property
    def room(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]


class Transfer(NamedTuple):
    """Rows to copy between the slab and the pages (PagedKVCache.transfer): arrays (R,)."""

    slots: Any
    positions: Any
    pool_rows: Any
