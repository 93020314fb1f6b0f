"""Page allocator of the latent cache: free list, reference counts and the prefix cache.

Pure Python (no torch): the scheduler asks it for pages and the router imports
`prefix_page_hashes` from here.

A page holds 64 consecutive tokens of one sequence. Full pages can be registered in the prefix
cache under a chained hash (the hash of the parent page's hash and the page's token ids), so a
later sequence whose prompt starts with the same tokens reuses them instead of recomputing.
A page's life:

    free  --allocate-->  in use (ref >= 1)  --free (ref -> 0)-->  free            (no hash)
                                            --free (ref -> 0)-->  cached-free     (hash registered)
    cached-free  --acquire (prefix hit)-->  in use
    cached-free  --allocate evicts it, least recently freed first-->  in use, hash forgotten

Cached-free pages count as free: they hold reusable data but are given away as soon as a fresh
page is needed and the plain free list is empty.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

PAGE_SIZE = 64
_HASH_PERSON = b"mlaserve.page.v1"  # domain separation of the page hash (16 bytes, blake2b's maximum)
_ROOT = b"\x00" * 8  # the parent "hash" of a sequence's first page


def prefix_page_hashes(token_ids: Sequence[int], page_size: int = PAGE_SIZE) -> list[int]:
    """Chained hashes of the full pages of `token_ids` (a trailing partial page gets none).

    hash[i] = blake2b(hash[i-1] bytes || page i's token ids as little-endian int64), 64 bits.
    Deterministic across processes and machines (no salted `hash()`), so a router and its
    workers agree on them.
    """
    return extend_page_hashes([], token_ids, page_size)


def extend_page_hashes(hashes: list[int], token_ids: Sequence[int], page_size: int = PAGE_SIZE) -> list[int]:
    """Appends to `hashes` (the chain of the first len(hashes) pages of token_ids) the hashes
    of the following full pages, and returns it. Lets a growing sequence hash each page once."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    fmt = struct.Struct(f"<{page_size}q")
    parent = hashes[-1].to_bytes(8, "little") if hashes else _ROOT
    for start in range(len(hashes) * page_size, len(token_ids) - page_size + 1, page_size):
        page = token_ids[start : start + page_size]
        digest = hashlib.blake2b(parent + fmt.pack(*page), digest_size=8, person=_HASH_PERSON).digest()
        hashes.append(int.from_bytes(digest, "little"))
        parent = digest
    return hashes


class OutOfPages(RuntimeError):
    """Raised when more pages are requested than are free."""


class PageAllocator:
    """Owns the physical page ids 0..num_pages-1 of one worker's latent cache."""

    def __init__(
        self, num_pages: int, page_size: int = PAGE_SIZE, enable_prefix_caching: bool = True
    ) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))  # ref 0, no hash
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # ref 0, hashed; oldest first
        self._hash_of: dict[int, int] = {}  # page -> its prefix hash
        self._page_of: dict[int, int] = {}  # prefix hash -> page
        self.evictions = 0  # cached pages given away for fresh data

    # ----------------------------------------------------------------------------- queries
    @property
    def num_free(self) -> int:
        """Pages a fresh allocation can take (cached-but-unreferenced pages included)."""
        return len(self._free) + len(self._cached_free)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Pages registered in the prefix cache (referenced or not)."""
        return len(self._page_of)

    def ref_count(self, page: int) -> int:
        return self._ref[page]

    def is_free(self, page: int) -> bool:
        return self._ref[page] == 0

    def cached_hashes(self) -> frozenset[int]:
        """Hashes of every full page the prefix cache holds."""
        return frozenset(self._page_of)

    def match_prefix(self, hashes: Sequence[int]) -> list[int]:
        """Pages of the longest cached prefix of `hashes` (no references are taken)."""
        pages: list[int] = []
        if not self.enable_prefix_caching:
            return pages
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    # ---------------------------------------------------------------------------- changes
    def allocate(self, n: int) -> list[int]:
        """n fresh pages (ref 1 each); all or nothing. Evicts cached-free pages, LRU first."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > self.num_free:
            raise OutOfPages(f"{n} pages requested, {self.num_free} free of {self.num_pages}")
        pages: list[int] = []
        for _ in range(n):
            if self._free:
                page = self._free.popleft()
            else:
                page, _ = self._cached_free.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
                self.evictions += 1
            self._ref[page] = 1
            pages.append(page)
        return pages

    def acquire(self, pages: Iterable[int]) -> None:
        """Take one more reference on each page: in-use pages, or cached-free ones (a prefix hit)."""
        for page in pages:
            if self._ref[page] == 0:
                if page not in self._cached_free:
                    raise ValueError(f"page {page} is free and uncached: allocate it instead of acquiring it")
                del self._cached_free[page]
            self._ref[page] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference on each page, in the order given.

        Pass a page table reversed so that, among its pages that become cached-free, the tail
        ones are evicted first and the shareable prefix lives longest.
        """
        for page in pages:
            if self._ref[page] <= 0:
                raise ValueError(f"page {page} freed more often than it was allocated")
            self._ref[page] -= 1
            if self._ref[page] == 0:
                if page in self._hash_of:
                    self._cached_free[page] = None
                else:
                    self._free.append(page)

    def register(self, page: int, page_hash: int) -> bool:
        """Publish an in-use full page under its prefix hash. False when the hash is already
        held by another page (that one stays the cached copy) or prefix caching is off."""
        if self._ref[page] <= 0:
            raise ValueError(f"page {page} is not in use; only pages holding data can be registered")
        if not self.enable_prefix_caching:
            return False
        known = self._hash_of.get(page)
        if known is not None:
            if known != page_hash:
                raise ValueError(f"page {page} is already registered under another hash")
            return True
        if page_hash in self._page_of:
            return False
        self._hash_of[page] = page_hash
        self._page_of[page_hash] = page
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash; cached-free pages go back to the plain free list."""
        for page in self._cached_free:
            self._free.append(page)
        self._cached_free.clear()
        self._hash_of.clear()
        self._page_of.clear()

    # -------------------------------------------------------------------------- integrity
    def check_integrity(self) -> None:
        """Raises AssertionError when the bookkeeping is inconsistent."""
        free = list(self._free)
        free_set = set(free)
        cached_free = list(self._cached_free)
        assert len(free_set) == len(free), "a page is twice on the free list"
        assert not free_set & set(cached_free), "a page is both free and cached-free"
        for page in range(self.num_pages):
            ref = self._ref[page]
            assert ref >= 0, f"page {page} has a negative reference count"
            if ref == 0:
                assert (page in self._cached_free) != (page in free_set), f"unreferenced page {page} is lost"
            else:
                assert page not in self._cached_free, f"referenced page {page} is on the cached-free list"
        assert all(self._ref[p] == 0 for p in free), "a referenced page is on the free list"
        assert all(p not in self._hash_of for p in free), "a hashed page is on the plain free list"
        assert all(p in self._hash_of for p in cached_free), "an unhashed page is on the cached-free list"
        assert len(self._hash_of) == len(self._page_of), "hash maps disagree in size"
        for page, h in self._hash_of.items():
            assert self._page_of.get(h) == page, f"hash of page {page} does not map back to it"
        assert self.num_free + sum(1 for r in self._ref if r > 0) == self.num_pages, "pages are not conserved"
