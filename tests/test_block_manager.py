"""Block allocator properties: refcounts, fork, copy-on-write, no leaks (with a real cache)."""
import random

import pytest
import torch

from score_kernels import copy_blocks, store_kv
from score_train.rollout.block_manager import BlockManager, OutOfBlocks


def read(cache, table, bs):
    """The values a table's tokens hold in the cache."""
    slots = [table.blocks[t // bs] * bs + t % bs for t in range(table.num_tokens)]
    return cache.view(-1)[torch.tensor(slots, dtype=torch.long)].tolist() if slots else []


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bs", [1, 4, 16])
def test_random_fork_append_free(seed, bs):
    rng = random.Random(seed)
    nb = 64
    bm = BlockManager(nb, bs)
    # one-value-per-slot caches driven through the real cache ops; V mirrors K
    kc = torch.full((nb, bs, 1, 1), -1.0)
    vc = torch.full((nb, bs, 1, 1), -1.0)
    live = []  # (table, expected token values)
    counter = 0
    for _ in range(300):
        op = rng.random()
        if op < 0.25 or not live:
            live.append((bm.new_table(), []))
        elif op < 0.4:
            i = rng.randrange(len(live))
            t, vals = live[i]
            try:
                kids = bm.fork(t, rng.randint(1, 3))
            except OutOfBlocks:
                continue
            live += [(k, list(vals)) for k in kids]
        elif op < 0.55:
            t, _ = live.pop(rng.randrange(len(live)))
            bm.free(t)
        else:
            i = rng.randrange(len(live))
            t, vals = live[i]
            n = rng.randint(1, 2 * bs + 1)
            before = {id(o[0]): read(kc, o[0], bs) for o in live}
            try:
                slots, copies = bm.append(t, n)
            except OutOfBlocks:
                bm.check([o[0] for o in live])
                continue
            if copies:
                copy_blocks(kc, vc, torch.tensor(copies, dtype=torch.long))
            new = [float(counter + j) for j in range(n)]
            counter += n
            key = torch.tensor(new).view(n, 1, 1)
            store_kv(key, key.clone(), kc, vc, torch.tensor(slots, dtype=torch.long))
            vals += new
            # shared blocks of every other table are untouched (bit-identical)
            for o in live:
                if o[0] is not t:
                    assert read(kc, o[0], bs) == before[id(o[0])]
        bm.check([o[0] for o in live])
        for t, vals in live:
            assert read(kc, t, bs) == vals
            assert read(vc, t, bs) == vals
    for t, _ in live:
        bm.free(t)
    bm.check([])
    assert bm.num_free == nb


def test_cow_only_for_partial_shared_tail():
    bm = BlockManager(8, 4)
    t = bm.new_table()
    bm.append(t, 4)  # one full block
    a, b = bm.fork(t, 2)
    bm.free(t)
    slots, copies = bm.append(a, 1)  # full tail: new block, no copy
    assert copies == [] and slots == [a.blocks[1] * 4]
    bm.append(b, 2)
    c, d = bm.fork(b, 2)
    _, copies = bm.append(c, 1)  # partially filled shared tail: copied
    assert len(copies) == 1 and copies[0][0] == d.blocks[1] and copies[0][1] == c.blocks[1]
    bm.free(b)
    _, copies = bm.append(d, 1)  # sole owner now: writes in place
    assert copies == []
    bm.check([a, c, d])
    for x in (a, c, d):
        bm.free(x)
    bm.check([])
    assert bm.num_free == 8


def test_out_of_blocks_leaves_state_unchanged():
    bm = BlockManager(2, 4)
    t = bm.new_table()
    bm.append(t, 8)
    with pytest.raises(OutOfBlocks):
        bm.append(t, 1)
    assert t.num_tokens == 8 and len(t.blocks) == 2
    bm.check([t])


def test_double_free_detected():
    bm = BlockManager(4, 4)
    t = bm.new_table()
    bm.append(t, 3)
    blocks = list(t.blocks)
    bm.free(t)
    t.blocks = blocks
    with pytest.raises(AssertionError):
        bm.free(t)
