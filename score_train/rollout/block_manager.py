"""Block allocator for the paged KV cache: reference counts, a free list, fork, copy-on-write.

A sequence's cache is a `BlockTable`: the list of block ids holding its tokens in order and how
many tokens it holds. Token t lives in slot `blocks[t // block_size] * block_size + t % block_size`.
Blocks shared by several tables (after `fork`) are read-only; appending into a shared, partially
filled tail block first copies it (the caller performs the returned (src, dst) copies on the
cache tensors before writing).
"""
from __future__ import annotations

from dataclasses import dataclass, field


class OutOfBlocks(RuntimeError):
    pass


@dataclass
class BlockTable:
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16):
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.reset(num_blocks)

    def reset(self, num_blocks: int) -> None:
        """Every block free, in a pool of num_blocks (the engine resizes its pool per call)."""
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.refcount = [0] * num_blocks
        # pop() from the end: low block ids first, which keeps small runs compact in the pool
        self.free_list = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _alloc(self) -> int:
        if not self.free_list:
            raise OutOfBlocks("KV cache is full")
        b = self.free_list.pop()
        self.refcount[b] = 1
        return b

    def _decref(self, b: int) -> None:
        self.refcount[b] -= 1
        if self.refcount[b] == 0:
            self.free_list.append(b)
        elif self.refcount[b] < 0:
            raise AssertionError(f"block {b} freed twice")

    def new_table(self) -> BlockTable:
        return BlockTable()

    def append(self, table: BlockTable, n: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Make room for n more tokens. Returns their slots and the (src, dst) block copies that
        must happen before they are written (copy-on-write of a shared, partially filled tail)."""
        bs = self.block_size
        copies: list[tuple[int, int]] = []
        if n <= 0:
            return [], copies
        need = self.blocks_needed(table.num_tokens + n) - len(table.blocks)
        cow = table.num_tokens % bs != 0 and self.refcount[table.blocks[-1]] > 1
        if need + cow > self.num_free:
            raise OutOfBlocks(f"KV cache is full: need {need + cow} blocks, {self.num_free} free")
        if cow:
            src = table.blocks[-1]
            dst = self._alloc()
            self._decref(src)
            table.blocks[-1] = dst
            copies.append((src, dst))
        for _ in range(need):
            table.blocks.append(self._alloc())
        start = table.num_tokens
        table.num_tokens += n
        blocks = table.blocks
        slots = [blocks[t // bs] * bs + t % bs for t in range(start, start + n)]
        return slots, copies

    def fork(self, table: BlockTable, n: int) -> list[BlockTable]:
        """n new tables sharing every block of `table` (which stays valid; free it if unneeded)."""
        for b in table.blocks:
            self.refcount[b] += n
        return [BlockTable(list(table.blocks), table.num_tokens) for _ in range(n)]

    def free(self, table: BlockTable) -> None:
        for b in table.blocks:
            self._decref(b)
        table.blocks = []
        table.num_tokens = 0

    def check(self, live: list[BlockTable]) -> None:
        """Raise if reference counts disagree with the live tables or blocks leaked."""
        count = [0] * self.num_blocks
        for t in live:
            for b in t.blocks:
                count[b] += 1
        if count != self.refcount:
            bad = [b for b in range(self.num_blocks) if count[b] != self.refcount[b]][:5]
            raise AssertionError(f"refcounts disagree with live tables at blocks {bad}")
        free = set(self.free_list)
        if len(free) != len(self.free_list):
            raise AssertionError("a block is on the free list twice")
        used = {b for b in range(self.num_blocks) if self.refcount[b] > 0}
        if free & used or len(free) + len(used) != self.num_blocks:
            raise AssertionError(f"leak: {self.num_blocks - len(free) - len(used)} blocks neither free nor used")
