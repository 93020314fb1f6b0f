"""PageAllocator: a hypothesis state machine against an independent model, and the page hashes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import OrderedDict

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from mlaserve.worker.page_allocator import OutOfPages, PageAllocator, extend_page_hashes, prefix_page_hashes

NUM_PAGES = 6


class AllocatorMachine(RuleBasedStateMachine):
    """Holders (think: sequences) take, share and release pages; the model tracks what must be true."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = PageAllocator(NUM_PAGES, page_size=4)
        self.holders: list[list[int]] = []
        self.hash_of: dict[int, int] = {}  # model of the prefix cache: page -> hash
        self.lru: OrderedDict[int, None] = OrderedDict()  # model: cached pages nobody holds, oldest first

    def refs(self) -> dict[int, int]:
        count: dict[int, int] = {}
        for pages in self.holders:
            for p in pages:
                count[p] = count.get(p, 0) + 1
        return count

    @rule(n=st.integers(0, 4))
    def allocate(self, n: int) -> None:
        held = set(self.refs())
        free = NUM_PAGES - len(held)
        if n > free:
            with pytest.raises(OutOfPages):
                self.alloc.allocate(n)
            return
        plain_free = free - len(self.lru)
        expected_evicted = list(self.lru)[: max(0, n - plain_free)]
        pages = self.alloc.allocate(n)
        assert len(set(pages)) == n and not set(pages) & held, "a fresh page was already in use"
        assert set(expected_evicted) <= set(pages), "eviction did not follow LRU order"
        for p in expected_evicted:
            del self.lru[p]
            del self.hash_of[p]
        assert not set(pages) & set(self.hash_of), "a fresh page kept its hash"
        self.holders.append(pages)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def release(self, data) -> None:
        pages = self.holders.pop(data.draw(st.integers(0, len(self.holders) - 1)))
        self.alloc.free(reversed(pages))
        still_held = self.refs()
        for p in reversed(pages):
            if p not in still_held and p in self.hash_of and p not in self.lru:
                self.lru[p] = None

    @precondition(lambda self: self.holders)
    @rule(data=st.data(), h=st.integers(0, 7))
    def register(self, data, h: int) -> None:
        pages = self.holders[data.draw(st.integers(0, len(self.holders) - 1))]
        if not pages:
            return
        page = data.draw(st.sampled_from(pages))
        if page in self.hash_of and self.hash_of[page] != h:
            with pytest.raises(ValueError):
                self.alloc.register(page, h)
            return
        owner = next((p for p, hh in self.hash_of.items() if hh == h), None)
        ok = self.alloc.register(page, h)
        assert ok == (owner is None or owner == page)
        if owner is None:
            self.hash_of[page] = h

    @rule(hashes=st.lists(st.integers(0, 7), max_size=4, unique=True))
    def share_prefix(self, hashes: list[int]) -> None:
        matched = self.alloc.match_prefix(hashes)
        page_of = {h: p for p, h in self.hash_of.items()}
        expected = []
        for h in hashes:
            if h not in page_of:
                break
            expected.append(page_of[h])
        assert matched == expected
        self.alloc.acquire(matched)
        for p in matched:
            self.lru.pop(p, None)
        self.holders.append(list(matched))

    @rule()
    def acquire_free_uncached_page_is_refused(self) -> None:
        held = set(self.refs())
        plain = [p for p in range(NUM_PAGES) if p not in held and p not in self.hash_of]
        if plain:
            with pytest.raises(ValueError):
                self.alloc.acquire([plain[0]])

    @invariant()
    def consistent(self) -> None:
        self.alloc.check_integrity()
        refs = self.refs()
        for p in range(NUM_PAGES):
            assert self.alloc.ref_count(p) == refs.get(p, 0)
        assert self.alloc.num_free == NUM_PAGES - len(refs)
        assert self.alloc.cached_hashes() == frozenset(self.hash_of.values())


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


def test_double_free_and_bad_counts_are_refused() -> None:
    alloc = PageAllocator(4)
    (p,) = alloc.allocate(1)
    alloc.free([p])
    with pytest.raises(ValueError, match="freed more often"):
        alloc.free([p])
    with pytest.raises(ValueError):
        alloc.allocate(-1)
    with pytest.raises(ValueError, match="not in use"):
        alloc.register(p, 123)
    with pytest.raises(ValueError):
        PageAllocator(0)


def test_prefix_caching_off_registers_nothing() -> None:
    alloc = PageAllocator(4, enable_prefix_caching=False)
    pages = alloc.allocate(2)
    assert not alloc.register(pages[0], 1)
    assert alloc.match_prefix([1]) == []
    alloc.free(pages)
    assert alloc.num_free == 4 and alloc.cached_hashes() == frozenset()
    alloc.check_integrity()


def test_prefix_page_hashes_chain(seed: int) -> None:
    rng = random.Random(seed)
    ps = 8
    tokens = [rng.randrange(50_000) for _ in range(ps * 5 + rng.randrange(ps))]
    hashes = prefix_page_hashes(tokens, ps)
    assert len(hashes) == len(tokens) // ps
    assert len(set(hashes)) == len(hashes)
    # A prefix's hashes are a prefix of the hashes; a trailing partial page has none.
    cut = rng.randrange(len(tokens))
    assert prefix_page_hashes(tokens[:cut], ps) == hashes[: cut // ps]
    # Extending an existing chain gives the same hashes as hashing from scratch.
    assert extend_page_hashes(hashes[:2], tokens, ps) == hashes
    # Changing one token changes its page's hash and every later one, none before.
    i = rng.randrange(len(hashes) * ps)
    changed = list(tokens)
    changed[i] += 1
    other = prefix_page_hashes(changed, ps)
    page = i // ps
    assert other[:page] == hashes[:page]
    assert all(a != b for a, b in zip(other[page:], hashes[page:]))
    # The same page content after a different prefix hashes differently (the chain).
    assert prefix_page_hashes(tokens[ps : 2 * ps], ps)[0] != hashes[1]


def test_prefix_page_hashes_are_stable_across_processes() -> None:
    tokens = list(range(200))
    code = "from mlaserve.worker.page_allocator import prefix_page_hashes; print(prefix_page_hashes(list(range(200))))"
    outs = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.add(out.stdout.strip())
    assert outs == {str(prefix_page_hashes(tokens))}
