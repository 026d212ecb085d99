"""Radix prefix cache (SGLang's RadixAttention): token sequences -> the KV slots that hold them.

A radix tree whose edges are runs of token ids, each with the KV slots of those tokens. Every
request that finishes (or is retracted, or aborted) leaves the KV of what it computed in the tree;
a request being admitted takes the longest cached prefix of its sequence and computes only the
rest. Pure Python, no torch: the tree only moves slot numbers, the KV stays where it is.

Ownership. A slot is held either by a request (its own, computed part) or by the tree. Slots the
tree holds are shared: a request that matched a prefix references them and must never free them.
`lock(node)` pins the path root..node while a request uses it (a reference count per node); only
leaves with no lock are evicted, least recently used first, when the pool runs short (before the
scheduler retracts a running request). `evictable` counts the unlocked slots: they are as good as
free for admission and the stats.

Eviction order is kept in a heap of unlocked leaves that lives as long as the tree: an entry is
pushed whenever a node becomes an unlocked leaf or such a leaf is used, and entries that no longer
hold (the node was used again, locked, got a child, or went) are dropped when they surface or when
the heap outgrows the tree (then it is rebuilt). So an eviction costs O(log n) per leaf it frees,
not a walk of the whole tree: once a server's pool was full of cached prefixes, that walk ran for
every admitted request and grew with the requests served (issue #14).

Pages. Keys are matched in whole pages (`page_size` tokens; 1 today), so a future paged KV pool
only changes this constant: a match is a multiple of the page size and an insert keeps full pages.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Callable


class Node:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access", "in_tree")

    def __init__(self, parent: "Node | None", key: list[int], value: list[int], now: int):
        self.children: dict = {}  # first page of the child's key (a token id at page size 1) -> child
        self.parent = parent
        self.key = key  # token ids of the edge into this node
        self.value = value  # their KV slots
        self.lock_ref = 0
        self.last_access = now
        self.in_tree = True  # False once evicted (a stale heap entry may still name it)


class RadixCache:
    def __init__(self, free_slots: Callable[[list[int]], None], page_size: int = 1):
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        self.free_slots = free_slots  # gives slots back to the KV allocator
        self.page_size = page_size
        self._tick = itertools.count(1)  # logical clock for LRU (deterministic, unlike time)
        self.root = Node(None, [], [], 0)
        self.root.lock_ref = 1  # never evicted
        self.total = 0  # slots the tree holds
        self.evictable = 0  # ... of which no running request holds a lock
        # Bumped whenever what a sequence matches can change (a new leaf, an eviction); a split does
        # not change any match (the deepest node of a match keeps its end). Lets a caller keep a
        # match (`match_length`) until the tree changes.
        self.version = 0
        # Eviction candidates: (last_access, seq, node) for unlocked leaves, stale entries included
        # (see the module's docstring); `nodes` counts the tree's nodes, which bounds the heap.
        self._heap: list[tuple[int, int, Node]] = []
        self._seq = itertools.count()
        self.nodes = 0

    def _page_key(self, ids: list[int], i: int):
        return ids[i] if self.page_size == 1 else tuple(ids[i:i + self.page_size])

    # ---- lookup ----------------------------------------------------------------------------

    def match_prefix(self, ids: list[int]) -> tuple[list[int], Node]:
        """The KV slots of the longest cached prefix of `ids` (whole pages) and its deepest node.
        An edge matched part-way is split, so the node returned covers exactly the match."""
        slots: list[int] = []
        node = self._match(ids, slots)[1]
        return slots, node

    def match_length(self, ids: list[int]) -> tuple[int, Node]:
        """(length, deepest node) of the longest cached prefix, as match_prefix, without gathering
        its slots (what a scheduler needs to budget a waiting request)."""
        return self._match(ids, None)

    def touch(self, node: Node) -> None:
        """Mark a kept match as just used (LRU), as matching it again would."""
        node.last_access = next(self._tick)
        if not node.children and node.lock_ref == 0 and node is not self.root:
            self._push(node)

    def _match(self, ids: list[int], slots: list[int] | None) -> tuple[int, Node]:
        end = len(ids) - len(ids) % self.page_size
        node, i = self.root, 0
        now = next(self._tick)
        while i < end:
            child = node.children.get(self._page_key(ids, i))
            if child is None:
                break
            n = _common(child.key, ids, i, self.page_size, end)
            if n < len(child.key):
                if n == 0:
                    break
                child = self._split(child, n)
            child.last_access = now
            if slots is not None:
                slots.extend(child.value)
            node = child
            i += n
            if n < len(child.key):
                break
        if not node.children and node.lock_ref == 0:  # a used leaf moves back in the eviction order
            self._push(node)
        return i, node

    def _split(self, node: Node, n: int) -> Node:
        """Cut node's edge after n tokens: a new parent holds the first n, node keeps the rest."""
        mid = Node(node.parent, node.key[:n], node.value[:n], node.last_access)
        self.nodes += 1
        mid.lock_ref = node.lock_ref
        mid.children = {self._page_key(node.key, n): node}
        node.parent.children[self._page_key(node.key, 0)] = mid
        node.parent = mid
        node.key, node.value = node.key[n:], node.value[n:]
        return mid

    # ---- insert ------------------------------------------------------------------------------

    def insert(self, ids: list[int], slots: list[int]) -> int:
        """Put a computed sequence in the tree. Returns how many of its leading tokens were already
        there: the caller's slots for those are duplicates (unless they are the very slots it
        matched) and stay the caller's to free. The tree takes the slots after them (whole pages)."""
        if len(ids) != len(slots):
            raise ValueError(f"insert: {len(ids)} tokens but {len(slots)} slots")
        n_keep = len(ids) - len(ids) % self.page_size
        ids, slots = ids[:n_keep], slots[:n_keep]
        node, i = self.root, 0
        now = next(self._tick)
        while i < len(ids):
            child = node.children.get(self._page_key(ids, i))
            if child is None:
                leaf = Node(node, ids[i:], slots[i:], now)
                node.children[self._page_key(ids, i)] = leaf
                self.nodes += 1
                self.version += 1
                self.total += len(leaf.value)
                self.evictable += len(leaf.value)
                self._push(leaf)
                return i
            n = _common(child.key, ids, i, self.page_size)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            node = child
            i += n
        if node is not self.root and not node.children and node.lock_ref == 0:
            self._push(node)
        return i

    # ---- locks -------------------------------------------------------------------------------

    def lock(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable -= len(node.value)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: Node) -> None:
        if node is not self.root and node.lock_ref == 1 and not node.children:
            self._push(node)  # an unlocked leaf: evictable again (only the deepest node can be a leaf)
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable += len(node.value)
            elif node.lock_ref < 0:
                raise RuntimeError("radix cache: unlock without lock")
            node = node.parent

    def pin_cost(self, node: Node, seen: set[int]) -> int:
        """Slots of the path root..node that no request locks (they count in `evictable`, so as free,
        until a request that matched node locks it), skipping nodes in `seen` (ids of nodes another
        request's path already counted: a shared prefix is pinned once); adds the path to `seen`."""
        n = 0
        while node is not self.root and id(node) not in seen:
            seen.add(id(node))
            if node.lock_ref == 0:
                n += len(node.value)
            node = node.parent
        return n

    # ---- eviction ----------------------------------------------------------------------------

    def evict(self, n: int) -> int:
        """Free at least n slots (fewer if not that many are evictable): unlocked leaves, least
        recently used first; a parent whose last child went becomes a leaf in turn. Returns how many."""
        if n <= 0 or self.evictable == 0:
            return 0
        heap = self._heap
        self.version += 1
        freed = 0
        while freed < n and heap:
            la, _, leaf = heapq.heappop(heap)
            if not leaf.in_tree or leaf.lock_ref or leaf.children or leaf.last_access != la:
                continue  # stale: the leaf went, is locked, grew a child, or was used since
            self.free_slots(leaf.value)
            freed += len(leaf.value)
            self.total -= len(leaf.value)
            self.evictable -= len(leaf.value)
            parent = leaf.parent
            del parent.children[self._page_key(leaf.key, 0)]
            leaf.in_tree = False
            self.nodes -= 1
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, next(self._seq), parent))  # (no compaction mid-loop)
        return freed

    def _push(self, leaf: Node) -> None:
        """`leaf` is (still) an unlocked leaf as of its last_access: an eviction candidate."""
        heap = self._heap
        heapq.heappush(heap, (leaf.last_access, next(self._seq), leaf))
        if len(heap) > 2 * self.nodes + 64:
            self._compact()

    def _compact(self) -> None:
        """Drop the heap's stale entries (one live entry per unlocked leaf remains): at most `nodes`
        entries after it, so the next rebuild follows at least nodes + 64 pushes (amortised O(1))."""
        live, seen = [], set()
        for e in self._heap:
            leaf = e[2]
            if (leaf.in_tree and not leaf.lock_ref and not leaf.children and leaf.last_access == e[0]
                    and id(leaf) not in seen):
                seen.add(id(leaf))
                live.append(e)
        heapq.heapify(live)
        self._heap = live

    def heap_size(self) -> int:
        """Entries in the eviction heap, stale ones included (bounded by 2 * nodes + 64; for tests)."""
        return len(self._heap)

    def reset(self) -> bool:
        """Empty the tree (/flush_cache). Only when no request holds a lock; returns whether it did."""
        if self.evictable != self.total:
            return False
        self.evict(self.total)
        return True


def _common(key: list[int], ids: list[int], start: int, page: int, end: int | None = None) -> int:
    """Length of the common prefix of key and ids[start:end], in whole pages."""
    n = min(len(key), (len(ids) if end is None else end) - start)
    if (key if n == len(key) else key[:n]) == ids[start:start + n]:  # the usual case, compared in C
        return n - n % page
    i = 0
    while i < n and key[i] == ids[start + i]:
        i += 1
    return i - i % page
