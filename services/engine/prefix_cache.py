"""Prefix cache: a radix tree over page-aligned token blocks whose nodes own KV pages.

Each node is one full page of tokens (the edge from its parent is that page's token ids), so a
path from the root spells a page-aligned prompt prefix and its nodes' pages hold that prefix's
KV. A request admitted with a cached prefix references the path's nodes (a count per node) and
computes only the rest; when its prompt is computed, and again when it ends, its full pages are
inserted (new nodes adopt its pages; blocks already cached keep theirs, the request's copy is
freed at the end). Nodes nobody references are evictable, least recently used leaves first;
the page pool asks for that when it runs out (`PagePool.reclaimer`), so cached pages never
hold back a request and referenced pages are never evicted. At any time:
free pages + pages held only by requests + cached pages = the pool.

Like SGLang's RadixAttention and vLLM's automatic prefix caching; at most (prompt - 1) tokens
come from the cache, so the last prompt token is always computed (it gives the first logits).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.prefix_hash import next_hash
from services.engine.page_pool import PagePool

Events = Callable[[str, list[int], int], None]
"""Told of changes: ("stored", hashes of new pages in path order, their parent's hash) or
("removed", hashes, 0); hashes are `services.common.prefix_hash`'s (the engine thread calls it)."""


@dataclass(eq=False)
class Node:
    """One cached page: its tokens (the edge from the parent), its page, and who uses it."""

    key: tuple[int, ...]
    page: int
    parent: Node | None
    """None for the root, and for a node once evicted."""
    children: dict[tuple[int, ...], Node] = field(default_factory=dict)
    refs: int = 0
    """Requests that use this page now (an in-use node's ancestors are in use too)."""
    last_used: int = 0
    hash: int = 0
    """The chained hash of the prefix this node ends (`services.common.prefix_hash`)."""


class PrefixCache:
    """One DP rank's tree of cached KV pages over `pool`."""

    def __init__(self, pool: PagePool, events: Events | None = None):
        self.pool = pool
        self.events = events
        self.page_size = pool.page_size
        self.root = Node((), -1, None)
        self.num_cached = 0
        """Pages the tree owns."""
        self.num_evictable = 0
        """Of those, pages no request uses (each can be freed, leaves first)."""
        self._clock = itertools.count(1)
        self._leaves: list[tuple[int, int, Node]] = []
        """Heap of (last used, id, node) for nodes that became unused leaves; entries that went
        stale since (used again, given a child, evicted) are skipped when popped."""
        pool.reclaimer = self

    # -- lookup and use -------------------------------------------------------------------------

    def match(self, tokens: list[int]) -> list[Node]:
        """The cached path of `tokens`' leading full pages, leaving at least one token uncached."""
        usable = (len(tokens) - 1) // self.page_size
        path, node = [], self.root
        for i in range(usable):
            # None leaves the loop at once: `node` is a Node wherever it is used
            node = node.children.get(tuple(tokens[i * self.page_size : (i + 1) * self.page_size]))  # type: ignore[assignment]
            if node is None:
                break
            path.append(node)
        return path

    def evictable_among(self, path: list[Node]) -> int:
        """How many of `path`'s pages are evictable now (using them takes them out of the count)."""
        return sum(1 for node in path if node.refs == 0)

    def lock(self, path: list[Node]) -> None:
        """The caller uses these pages: none of them is evicted until `unlock`."""
        now = next(self._clock)
        for node in path:
            if node.refs == 0:
                self.num_evictable -= 1
            node.refs += 1
            node.last_used = now

    def unlock(self, path: list[Node]) -> None:
        now = next(self._clock)
        for node in path:
            node.refs -= 1
            node.last_used = now
            if node.refs == 0:
                self.num_evictable += 1
                if not node.children:
                    self._push(node)

    # -- filling and returning pages ------------------------------------------------------------

    def insert(self, tokens: list[int], pages: list[int], held: list[Node], num_tokens: int) -> list[Node]:
        """Cache the full pages of `tokens[:num_tokens]` (their KV is in `pages`, block by block)
        past the `held` path the caller already uses; returns the caller's longer path (locked).

        A block that is cached already keeps its page (the caller's copy stays the caller's until
        `release`); a new block's node takes the caller's page.
        """
        held = list(held)
        parent = held[-1] if held else self.root
        now = next(self._clock)
        stored: list[Node] = []
        for i in range(len(held), num_tokens // self.page_size):
            key = tuple(tokens[i * self.page_size : (i + 1) * self.page_size])
            node = parent.children.get(key)
            if node is None:
                node = parent.children[key] = Node(key, pages[i], parent, hash=next_hash(parent.hash, key))
                self.num_cached += 1
                stored.append(node)
            elif node.refs == 0:
                self.num_evictable -= 1
            node.refs += 1
            node.last_used = now
            held.append(node)
            parent = node
        if stored and self.events is not None:
            first = stored[0].parent
            self.events("stored", [n.hash for n in stored], first.hash if first is not None else 0)
        return held

    def release(self, pages: list[int], held: list[Node]) -> None:
        """The caller is done with `pages` (its page table) and the `held` path: pages the tree
        owns stay cached (evictable once nobody uses them), the caller's own go back to the pool."""
        self.unlock(held)
        owned = {node.page for node in held}
        self.pool.free([page for page in pages if page not in owned])

    # -- eviction -------------------------------------------------------------------------------

    def evict(self, num_pages: int) -> int:
        """Free up to `num_pages` unused pages, least recently used leaves first; returns how many."""
        freed: list[int] = []
        hashes: list[int] = []
        while self._leaves and len(freed) < num_pages:
            used, _, node = heapq.heappop(self._leaves)
            parent = node.parent
            if parent is None or node.refs or node.children or used != node.last_used:
                continue  # stale: evicted already, in use, no longer a leaf, or touched since
            del parent.children[node.key]
            node.parent = None
            freed.append(node.page)
            hashes.append(node.hash)
            if parent is not self.root and not parent.children and parent.refs == 0:
                self._push(parent)
        self.num_cached -= len(freed)
        self.num_evictable -= len(freed)
        self.pool.free(freed)
        if hashes and self.events is not None:
            self.events("removed", hashes, 0)
        return len(freed)

    def _push(self, node: Node) -> None:
        heapq.heappush(self._leaves, (node.last_used, id(node), node))
        if len(self._leaves) > 4 * self.num_cached + 64:  # drop the stale entries now and then
            self._leaves = [e for e in self._leaves if e[2].parent is not None and e[0] == e[2].last_used]
            heapq.heapify(self._leaves)

    def clear(self) -> int:
        """Evict every unused page (e.g. to compare against a cold start); returns how many."""
        return self.evict(self.num_evictable)

    def _nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out
