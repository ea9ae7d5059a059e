"""KV blocks for the scheduler: who holds which block, and which blocks hold a reusable prefix.

Integers and lists only. The cache is `num_blocks` blocks of `block_size` tokens; a sequence's
block table lists the blocks that hold its tokens in order (token t sits in block
`table[t // block_size]` at offset `t % block_size`).

Prefix caching: a full block whose K/V were all computed with every FFN gets a hash that chains
its parent's hash with its token ids, so a hash names the whole prefix up to the block's end. The
hash is SHA-256, not Python's `hash`: that one is 61 bits, the same in every process and easy to
invert, so a client could make its own prefix collide with another's system prompt and have the
next request read K/V computed for other text (vLLM's CVE-2025-25183 is this attack). A
new sequence walks its prompt's full blocks through that index and shares every hit (a reference
count per block); the first miss ends the walk. Shared blocks are full and are never written
again: the reusing sequence always computes at least its last prompt token itself, into a block it
owns. A block nobody references keeps its hash and K/V and waits in least-recently-freed order;
it is evicted (its hash forgotten) only when a fresh block is needed and no never-hashed block is
free.

A request's `cache_salt` (vLLM's) starts its chain from a root hashed from the salt instead of
from nothing, so its blocks are found only by prompts with the same salt: tenants who keep their
salts apart cannot learn from another's hits whether a prompt was seen (a timing side channel).
A LoRA adapter's requests chain from a root of their own in the same way (their K/V differ), keyed by
the adapter's slot, which a later adapter of the same name does not get.
"""
from __future__ import annotations

import hashlib
import json
from array import array
from collections import OrderedDict

NO_HASH = None


def chain_hash(parent: bytes | None, tokens: tuple[int, ...]) -> bytes:
    """The hash of a block holding `tokens` after the prefix whose last block's hash is `parent`."""
    return hashlib.sha256((parent or b"") + array("q", tokens).tobytes()).digest()


def salt_root(salt: str | tuple | None) -> bytes | None:
    """The parent hash a prompt's first block chains from: none without a salt. A tuple (a cache
    salt and a LoRA adapter's slot: engine/sequence.py) hashes apart from any salt string."""
    if salt is None:
        return None
    if isinstance(salt, tuple):
        return hashlib.sha256(b"prefix_key\0" + json.dumps(salt).encode("utf-8", "surrogatepass")).digest()
    return hashlib.sha256(b"cache_salt\0" + salt.encode("utf-8", "surrogatepass")).digest()


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.ref_counts = [0] * num_blocks
        self._hash_of: list[bytes | None] = [NO_HASH] * num_blocks
        self._tokens_of: list[tuple[int, ...]] = [()] * num_blocks  # a hashed block's token ids
        self._by_hash: dict[bytes, int] = {}
        self._empty = list(range(num_blocks - 1, -1, -1))  # free, nothing cached: popped from the end
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free, hashed: oldest first
        self._chains: dict[str, tuple[int, bytes | None]] = {}  # seq_id -> (blocks hashed, last hash)
        self._used = 0  # blocks with a reference, one int so other threads can read it

    # ---- capacity ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._empty) + len(self._evictable)

    def usage(self) -> float:
        return self._used / self.num_blocks

    # ---- prefix lookup ---------------------------------------------------------------------------
    def cached_prefix(self, token_ids: list[int], limit: int, salt: str | tuple | None = None) -> list[int]:
        """Blocks holding the K/V of `token_ids`' leading full blocks, covering at most `limit` tokens,
        published under the same `salt`."""
        if not self.prefix_caching:
            return []
        hits, parent, size = [], salt_root(salt), self.block_size
        for start in range(0, limit - size + 1, size):
            tokens = tuple(token_ids[start:start + size])
            block = self._by_hash.get(chain_hash(parent, tokens))
            if block is None or self._tokens_of[block] != tokens:
                break
            hits.append(block)
            parent = self._hash_of[block]
        return hits

    # ---- sequences ---------------------------------------------------------------------------------
    def can_allocate(self, token_ids: list[int], num_tokens: int, spare: int = 0, reuse: bool = True,
                     salt: str | tuple | None = None) -> bool:
        """Room for a sequence whose first `num_tokens` of `token_ids` are to be computed, plus
        `spare` more blocks (`reuse`: whether it may take its cached prefix, under its `salt`)."""
        hits = self.cached_prefix(token_ids, num_tokens - 1 if reuse else 0, salt)
        waking = sum(1 for b in hits if self.ref_counts[b] == 0)  # free now, taken by the hits
        fresh = blocks_for(num_tokens, self.block_size) - len(hits)
        return self.num_free_blocks - waking >= fresh + spare

    def allocate(self, seq_id: str, token_ids: list[int], num_tokens: int, reuse: bool = True,
                 salt: str | tuple | None = None) -> tuple[list[int], int]:
        """Blocks for the first `num_tokens` of `token_ids`, reusing its cached prefix (unless not
        `reuse`: every token computed again, its blocks its own); its blocks are published under
        `salt` (found only by prompts with the same salt).

        -> (block table, tokens whose K/V the table already holds). At least the last of the
        `num_tokens` is left to compute, so no shared block is ever written."""
        hits = self.cached_prefix(token_ids, num_tokens - 1 if reuse else 0, salt)
        for block in hits:
            self._ref(block)
        table = hits + self.allocate_blocks(blocks_for(num_tokens, self.block_size) - len(hits))
        self._chains[seq_id] = (len(hits), self._hash_of[hits[-1]] if hits else salt_root(salt))
        return table, len(hits) * self.block_size

    def can_append(self, table: list[int], num_tokens: int) -> bool:
        return len(table) >= blocks_for(num_tokens, self.block_size) or self.num_free_blocks > 0

    def append(self, table: list[int], num_tokens: int) -> None:
        """Grow `table` (in place) to hold `num_tokens` tokens; check `can_append` first."""
        missing = blocks_for(num_tokens, self.block_size) - len(table)
        if missing > 0:
            table.extend(self.allocate_blocks(missing))

    def publishes(self, seq_id: str, num_dense: int) -> bool:
        """Whether `publish` would offer a block (a full dense block not yet offered): asked before
        the caller builds the token list `publish` reads."""
        return self.prefix_caching and (self._chains.get(seq_id, (0, None))[0] + 1) * self.block_size <= num_dense

    def publish(self, seq_id: str, table: list[int], token_ids: list[int], num_dense: int) -> None:
        """Offer for reuse the full blocks among the first `num_dense` tokens (K/V computed with
        every FFN). A prefix another block in use already holds stays with that block (two sequences
        that computed it at once: this copy keeps the key, and takes the prefix over when freed if the
        holder was evicted meanwhile, else it is dropped); one that only a free block holds moves
        here."""
        if not self.prefix_caching:
            return
        done, parent = self._chains.get(seq_id, (0, None))
        size = self.block_size
        while (done + 1) * size <= num_dense:
            block, tokens = table[done], tuple(token_ids[done * size:(done + 1) * size])
            key = chain_hash(parent, tokens)
            holder = self._by_hash.get(key)
            if holder is not None and holder != block and self.ref_counts[holder] == 0:
                self._forget(holder)  # a free copy gives the prefix to this live one
                holder = None
            if self._hash_of[block] is NO_HASH:  # a copy beside a live holder keeps its key too:
                self._hash_of[block], self._tokens_of[block] = key, tokens  # (see free_blocks)
                if holder is None:
                    self._by_hash[key] = block
            done, parent = done + 1, key
        self._chains[seq_id] = (done, parent)

    def free(self, seq_id: str, table: list[int]) -> None:
        """Drop a sequence's references. Its tail goes first in eviction order: a prefix's later
        blocks are worth less than its head, which other prompts share more often."""
        self._chains.pop(seq_id, None)
        self.free_blocks(reversed(table))
        table.clear()

    # ---- raw blocks (the scheduler's allocations use these too) ----------------------------------
    @property
    def num_empty_blocks(self) -> int:
        """Free blocks that hold no cached prefix: taking one evicts nothing."""
        return len(self._empty)

    def allocate_blocks(self, count: int) -> list[int]:
        if count > self.num_free_blocks:
            raise RuntimeError(f"{count} KV blocks asked, {self.num_free_blocks} free")
        blocks = []
        for _ in range(count):
            if self._empty:
                block = self._empty.pop()
            else:  # evict the least recently freed cached block
                block, _ = self._evictable.popitem(last=False)
                self._unhash(block)
            self._ref(block)
            blocks.append(block)
        return blocks

    def free_blocks(self, blocks) -> None:
        for block in blocks:
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, block
            if self.ref_counts[block] == 0:
                self._used -= 1
                key = self._hash_of[block]
                if key is not NO_HASH and self._by_hash.setdefault(key, block) != block:
                    key = self._hash_of[block] = NO_HASH  # a copy of a prefix another block holds
                    self._tokens_of[block] = ()
                if key is NO_HASH:
                    self._empty.append(block)
                else:  # (a copy whose holder was evicted while it lived holds the prefix now)
                    self._evictable[block] = None

    def _unhash(self, block: int) -> None:
        del self._by_hash[self._hash_of[block]]
        self._hash_of[block], self._tokens_of[block] = NO_HASH, ()

    def _forget(self, block: int) -> None:
        """A free cached block's prefix dropped: it becomes an empty block."""
        del self._evictable[block]
        self._unhash(block)
        self._empty.append(block)

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self._used += 1
            self._evictable.pop(block, None)
        self.ref_counts[block] += 1
