"""The paged, prefix-sharing two-turn generation engine.

Every step packs all live sequences' uncomputed tokens (prefill chunks, the turn-2 extend, decode
tokens) into one forward over the paged KV cache; sequences join when their prompt group fits in
the cache and leave the batch as soon as they finish. Per prompt:

1. the prompt is prefilled once (a "parent" sequence);
2. n samples fork from it, sharing its blocks; each draws its first token from the parent's logits;
3. turn 1 decodes;
4. a finished turn 1 appends [its last token + instruction ids] (see `ChatFormat`);
5. one extend pass computes only those tokens (the prompt and y1 are already cached);
6. turn 2 decodes.

`stats` counts the tokens each phase computed, so tests can prove turn 2 recomputes nothing.
"""
from __future__ import annotations

import time

import torch

from score_train.rollout.block_manager import BlockManager
from score_train.rollout.types import SamplingParams, TwoTurnSample

DEFAULT_INSTRUCTION = (
    "There might be an error in the solution above because of lack of understanding of the question. "
    "Please correct the error, if any, and rewrite the solution. Only output the final solution! At the end "
    "of the Solution, when you give your final answer, write it in the form \"Final Answer: The final answer "
    "is $answer$. I hope it is correct.\"")

_PLACEHOLDER = "PLACEHOLDER"
_M63 = (1 << 63) - 1


def sample_seed(base: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample; its draws depend only on this and the token position."""
    return ((base * 1000003 + prompt_index) * 1000003 + sample_index) & _M63


def _ids(out) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


class ChatFormat:
    """Prompt ids and turn-2 instruction ids from the tokenizer's chat template, as token ids.

    instruction ids are found by templating [user x, assistant PLACEHOLDER, user instruction] and
    cutting the ids at the placeholder: what follows it is the template's end of turn, the user
    turn and the assistant header. When y1 already ended with that end-of-turn token, it is not
    repeated. Generated text is never re-tokenised.
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._ph = _ids(tokenizer.encode(_PLACEHOLDER, add_special_tokens=False))
        self._suffix_cache: dict[tuple[str, str], list[int]] = {}

    def _template(self, messages, gen: bool) -> list[int]:
        return _ids(self.tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True))

    def prompt_ids(self, prompt: str) -> list[int]:
        return self._template([{"role": "user", "content": prompt}], True)

    def suffix_ids(self, prompt: str, instruction: str) -> list[int]:
        """Everything the template puts after y1's content, up to and including the assistant header."""
        key = (prompt, instruction)
        if key not in self._suffix_cache:
            head = self.prompt_ids(prompt)
            full = self._template([{"role": "user", "content": prompt},
                                   {"role": "assistant", "content": _PLACEHOLDER},
                                   {"role": "user", "content": instruction}], True)
            ph = self._ph
            if full[:len(head)] != head or full[len(head):len(head) + len(ph)] != ph:
                raise ValueError("the chat template does not render [user, assistant, user] as the prompt "
                                 "followed by the assistant's content; cannot build turn-2 ids")
            self._suffix_cache[key] = full[len(head) + len(ph):]
        return self._suffix_cache[key]

    @staticmethod
    def instruction_ids(suffix: list[int], turn1_ids: list[int], eos_ids) -> list[int]:
        if turn1_ids and suffix and turn1_ids[-1] in eos_ids and turn1_ids[-1] == suffix[0]:
            return suffix[1:]
        return list(suffix)


def eos_ids_of(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(model.config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    return ids


class _Group:
    __slots__ = ("index", "live", "n", "prompt_ids", "reserved", "seeds", "suffix")

    def __init__(self, index, prompt_ids, suffix, n, seeds):
        self.index, self.prompt_ids, self.suffix, self.n, self.seeds = index, prompt_ids, suffix, n, seeds
        self.reserved = 0
        self.live = 0


class _Seq:
    __slots__ = (
        "computed",
        "ext_end",
        "group",
        "instruction_ids",
        "out_ids",
        "out_lp",
        "reasons",
        "sample_index",
        "seed",
        "table",
        "tokens",
        "turn",
    )

    def __init__(self, group, sample_index, seed, tokens, computed, table, turn):
        self.group, self.sample_index, self.seed = group, sample_index, seed
        self.tokens, self.computed, self.table, self.turn = tokens, computed, table, turn
        self.out_ids: list[list[int]] = [[], []]
        self.out_lp: list[list[float]] = [[], []]
        self.reasons: list[str] = []
        self.instruction_ids: list[int] = []
        self.ext_end = 0


class Engine:
    """Paged two-turn generation on a model from score_train.model (same parameters, no copy).

    num_blocks: KV-cache blocks per layer; None sizes the pool to each call's worst case, capped by
    kv_cache_gb (default 2 GB on CPU, 40% of free memory on a GPU). max_batch_tokens caps the
    tokens of one forward (prompts longer than that are prefilled in chunks); max_num_seqs caps the
    live sequences.
    """

    PHASES = ("prompt_prefill", "turn1_decode", "turn2_extend", "turn2_decode")

    def __init__(self, model, tokenizer, *, block_size: int = 16, num_blocks: int | None = None,
                 max_batch_tokens: int | None = None, max_num_seqs: int | None = None,
                 kv_cache_gb: float | None = None, eos_token_ids=None):
        self.model, self.tokenizer = model, tokenizer  # tokenizer may be None for generate_ids
        self.chat = ChatFormat(tokenizer) if tokenizer is not None else None
        self.block_size = block_size
        self.fixed_blocks = num_blocks
        cpu = model.device.type == "cpu"
        self.max_batch_tokens = max_batch_tokens or (2048 if cpu else 16384)
        self.max_num_seqs = max_num_seqs or (256 if cpu else 1024)
        self.kv_cache_gb = kv_cache_gb
        self.eos_ids = set(eos_token_ids) if eos_token_ids is not None else eos_ids_of(model, tokenizer)
        self.caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.num_blocks = 0
        self.stats: dict[str, float] = {}

    # -- KV cache -------------------------------------------------------------------------------
    def _bytes_per_block(self) -> int:
        m = self.model
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * m.dtype.itemsize

    def _budget_blocks(self) -> int:
        if self.kv_cache_gb is not None:
            budget = self.kv_cache_gb * 1e9
        elif self.model.device.type == "cuda":
            budget = 0.4 * torch.cuda.mem_get_info(self.model.device)[0]
        else:
            budget = 2e9
        return max(1, int(budget // self._bytes_per_block()))

    def _ensure_pool(self, blocks: int) -> None:
        if self.caches and self.num_blocks >= blocks:
            return
        m = self.model
        self.caches = []  # release the old pool before allocating the new one
        shape = (blocks, self.block_size, m.num_kv_heads, m.head_dim)
        self.caches = [(torch.zeros(shape, dtype=m.dtype, device=m.device),
                        torch.zeros(shape, dtype=m.dtype, device=m.device)) for _ in range(m.num_layers)]
        self.num_blocks = blocks

    def release(self) -> None:
        """Free the KV pool (e.g. before a training step on a GPU); the next generate re-allocates it."""
        self.caches, self.num_blocks = [], 0

    def _worst_blocks(self, g: _Group, params, turns: int) -> int:
        per_child = len(g.prompt_ids) + turns * params.max_new_tokens + len(g.suffix) + 2 * self.block_size
        return -(-len(g.prompt_ids) // self.block_size) + g.n * -(-per_child // self.block_size)

    # -- public API -----------------------------------------------------------------------------
    def generate(self, prompts: list[str], params: SamplingParams, *, two_turn: bool = True,
                 instruction: str | None = None, seeds: list[int] | None = None,
                 progress=None) -> list[TwoTurnSample]:
        """Returns len(prompts) * params.n samples ordered by (prompt_index, sample_index).
        seeds: optional per-sample seeds (len(prompts) * n), else derived from params.seed."""
        instruction = DEFAULT_INSTRUCTION if instruction is None else instruction
        prompt_ids = [self.chat.prompt_ids(p) for p in prompts]
        suffixes = [self.chat.suffix_ids(p, instruction) if two_turn else [] for p in prompts]
        return self.generate_ids(prompt_ids, params, suffixes=suffixes if two_turn else None, seeds=seeds,
                                 progress=progress)

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams, *,
                     suffixes: list[list[int]] | None = None, seeds: list[int] | None = None,
                     progress=None) -> list[TwoTurnSample]:
        """Token-level generate: suffixes[i] are the ids the chat template puts after y1 (see
        ChatFormat.suffix_ids); None = one turn only."""
        n, two_turn = params.n, suffixes is not None
        turns = 2 if two_turn else 1
        if seeds is not None and len(seeds) != len(prompt_ids) * n:
            raise ValueError(f"seeds must have len(prompts) * n = {len(prompt_ids) * n} entries")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("empty prompt")
        groups = []
        for i, p in enumerate(prompt_ids):
            s = seeds[i * n:(i + 1) * n] if seeds is not None else [sample_seed(params.seed, i, j) for j in range(n)]
            groups.append(_Group(i, list(p), list(suffixes[i]) if two_turn else [], n, s))
        worst = [self._worst_blocks(g, params, turns) for g in groups]
        if self.fixed_blocks is not None:
            pool = self.fixed_blocks
        else:
            pool = min(sum(worst), self._budget_blocks())
        if max(worst, default=0) > pool:
            raise ValueError(f"one prompt group needs up to {max(worst)} KV blocks but the pool has {pool}: "
                             f"raise kv_cache_gb / num_blocks or lower max_new_tokens / n")
        self._ensure_pool(pool)
        bm = BlockManager(self.num_blocks, self.block_size)
        self.block_manager = bm
        self.stats = {k: 0 for k in self.PHASES} | {"steps": 0, "generated": 0, "seconds": 0.0,
                                                     "decode_steps": 0, "decode_seconds": 0.0, "decode_ctx_tokens": 0}
        t0 = time.perf_counter()
        stop = tuple(params.stop or ())
        waiting = list(zip(groups, worst))[::-1]
        running: list[_Seq] = []
        done: list[_Seq] = []
        reserved = 0
        while waiting or running:
            # admit whole prompt groups while their worst case fits (no preemption needed)
            while waiting and reserved + waiting[-1][1] <= self.num_blocks and \
                    len(running) + waiting[-1][0].n <= max(self.max_num_seqs, waiting[-1][0].n):
                g, w = waiting.pop()
                g.reserved, reserved = w, reserved + w
                running.append(_Seq(g, -1, 0, g.prompt_ids, 0, bm.new_table(), 0))
            # decode tokens first, then prefill/extend chunks with the remaining token budget
            running.sort(key=lambda s: len(s.tokens) - s.computed > 1)
            budget = self.max_batch_tokens
            batch, takes = [], []
            for s in running:
                take = min(len(s.tokens) - s.computed, budget)
                if take <= 0:
                    break
                batch.append(s)
                takes.append(take)
                budget -= take
            t_step = time.perf_counter()
            hidden_rows, sample_seqs = self._forward(batch, takes, bm)
            # sample: parents draw their n children's first tokens from one logits row
            if sample_seqs:
                logits = self.model.logits(hidden_rows).float()
                rows, sd, pos = [], [], []
                for r, s in enumerate(sample_seqs):
                    if s.turn == 0:
                        rows += [r] * s.group.n
                        sd += s.group.seeds
                        pos += [len(s.tokens)] * s.group.n
                    else:
                        rows.append(r)
                        sd.append(s.seed)
                        pos.append(len(s.tokens))
                toks, lps = self._sample(logits, rows, sd, pos, params)
                k = 0
                for s in sample_seqs:
                    if s.turn == 0:
                        g = s.group
                        children = bm.fork(s.table, g.n)
                        bm.free(s.table)
                        g.live = g.n
                        for j in range(g.n):
                            c = _Seq(g, j, g.seeds[j], list(s.tokens), s.computed, children[j], 1)
                            running.append(c)
                            self._push(c, toks[k], lps[k], params, stop, two_turn, bm, done)
                            k += 1
                        s.turn = -1  # the parent leaves
                    else:
                        self._push(s, toks[k], lps[k], params, stop, two_turn, bm, done)
                        k += 1
            keep = []
            for s in running:
                if s.turn in (0, 1, 2):
                    keep.append(s)
                elif s.turn == 3:
                    g = s.group
                    g.live -= 1
                    if g.live == 0:
                        reserved -= g.reserved
            running = keep
            self.stats["steps"] += 1
            if len(takes) == sum(takes):  # a pure decode step (timed for the roofline report)
                self.stats["decode_steps"] += 1
                self.stats["decode_seconds"] += time.perf_counter() - t_step
                self.stats["decode_ctx_tokens"] += self._ctx_sum
            if progress is not None:
                progress(len(sample_seqs) and sum(s.group.n if s.turn == -1 else 1 for s in sample_seqs))
        self.stats["seconds"] = time.perf_counter() - t0
        self.stats["generated"] = sum(len(s.out_ids[0]) + len(s.out_ids[1]) for s in done)
        bm.check([])
        return self._outputs(done, two_turn, n)

    # -- internals ------------------------------------------------------------------------------
    def _forward(self, batch: list[_Seq], takes: list[int], bm: BlockManager):
        """One forward over every batch sequence's next `take` tokens. Returns the final hidden
        state of each sequence whose tokens are now all computed (those draw a token)."""
        from score_kernels import copy_blocks
        from score_train.model import PagedBatch
        ids, pos, slots, copies, tables, ctx, cu = [], [], [], [], [], [], [0]
        st = self.stats
        for s, take in zip(batch, takes):
            a = s.computed
            ids += s.tokens[a:a + take]
            pos += range(a, a + take)
            sl, cp = bm.append(s.table, take)
            slots += sl
            copies += cp
            s.computed = a + take
            tables.append(s.table.blocks)
            ctx.append(s.computed)
            cu.append(cu[-1] + take)
            if s.turn == 0:
                st["prompt_prefill"] += take
            elif s.turn == 1:
                st["turn1_decode"] += take
            else:
                ext = max(0, min(s.ext_end, a + take) - a)
                st["turn2_extend"] += ext
                st["turn2_decode"] += take - ext
        self._ctx_sum = sum(ctx)
        dev = self.model.device
        if copies:
            bmap = torch.tensor(copies, dtype=torch.int64, device=dev)
            for kc, vc in self.caches:
                copy_blocks(kc, vc, bmap)
        width = max(len(t) for t in tables)
        bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
        q_lens = takes
        pb = PagedBatch(torch.tensor(slots, dtype=torch.int64, device=dev), bt,
                        torch.tensor(ctx, dtype=torch.int32, device=dev),
                        torch.tensor(cu, dtype=torch.int32, device=dev), self.block_size, q_lens, ctx,
                        self.model.scale)
        hidden = self.model.forward_paged(torch.tensor(ids, dtype=torch.int64, device=dev),
                                          torch.tensor(pos, dtype=torch.int64, device=dev), self.caches, pb)
        last = [cu[i + 1] - 1 for i, s in enumerate(batch) if s.computed == len(s.tokens)]
        sample_seqs = [s for s in batch if s.computed == len(s.tokens)]
        if not last:
            return None, []
        return hidden[torch.tensor(last, device=dev)], sample_seqs

    def _sample(self, logits, rows, seeds, positions, params: SamplingParams):
        from score_kernels import sample
        dev = logits.device
        b = len(rows)
        if rows != list(range(logits.shape[0])):
            logits = logits[torch.tensor(rows, device=dev)]
        temp = torch.full((b,), float(params.temperature), device=dev)
        top_p = torch.full((b,), float(params.top_p), device=dev) if params.top_p < 1.0 else None
        top_k = torch.full((b,), int(params.top_k), device=dev, dtype=torch.int64) if params.top_k > 0 else None
        toks, lps = sample(logits, temperature=temp, top_p=top_p, top_k=top_k,
                           seeds=torch.tensor(seeds, dtype=torch.int64, device=dev),
                           positions=torch.tensor(positions, dtype=torch.int64, device=dev))
        return toks.tolist(), lps.tolist()

    def _push(self, s: _Seq, tok: int, lp: float, params, stop, two_turn, bm, done) -> None:
        """Append a drawn token; finish the turn (and move to turn 2 or out) if it stops."""
        t = s.turn - 1
        s.tokens.append(tok)
        out = s.out_ids[t]
        out.append(tok)
        s.out_lp[t].append(lp)
        reason = None
        if tok in self.eos_ids:
            reason = "eos"
        elif stop and self._hit_stop(out, stop):
            reason = "stop"
        elif len(out) >= params.max_new_tokens:
            reason = "length"
        if reason is None:
            return
        s.reasons.append(reason)
        if s.turn == 1 and two_turn:
            s.instruction_ids = ChatFormat.instruction_ids(s.group.suffix, out, self.eos_ids)
            s.tokens += s.instruction_ids
            s.ext_end = len(s.tokens)
            s.turn = 2
            return
        s.turn = 3
        bm.free(s.table)
        done.append(s)

    def _hit_stop(self, out: list[int], stop) -> bool:
        longest = max(len(x) for x in stop)
        # a stop string that ends in this token lies within its last few tokens' text
        tail = self.tokenizer.decode(out[-(longest + 4):], skip_special_tokens=False)
        return any(x in tail for x in stop)

    def _outputs(self, done: list[_Seq], two_turn: bool, n: int) -> list[TwoTurnSample]:
        dec = self.tokenizer.decode if self.tokenizer is not None else (lambda ids, **kw: "")
        res = []
        for s in sorted(done, key=lambda s: (s.group.index, s.sample_index)):
            res.append(TwoTurnSample(
                prompt_index=s.group.index, sample_index=s.sample_index, prompt_ids=list(s.group.prompt_ids),
                turn1_ids=s.out_ids[0], turn1_logprobs=s.out_lp[0],
                turn1_text=dec(s.out_ids[0], skip_special_tokens=True), finish_reasons=s.reasons,
                instruction_ids=s.instruction_ids,
                turn2_ids=s.out_ids[1] if two_turn else None, turn2_logprobs=s.out_lp[1] if two_turn else None,
                turn2_text=dec(s.out_ids[1], skip_special_tokens=True) if two_turn else None))
        return res
