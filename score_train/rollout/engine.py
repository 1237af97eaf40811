"""The paged, prefix-sharing multi-turn generation engine (nano-vllm's shape).

- `sequence.py`: a prompt group and a `Sequence` with a `Status`;
- `scheduler.py`: admits whole prompt groups within the KV budget, picks each step's batch, appends the
  drawn tokens, ends turns and retires finished samples;
- `runner.py`: packs one forward over the paged KV cache (prefill chunks, instruction extends and
  decode tokens mixed), runs it and samples;
- this file: the public `generate` and the step loop.

Per prompt: the prompt is prefilled once (a parent sequence); n samples fork from it, sharing its
blocks, each drawing its first token from the parent's logits; turn 1 decodes; a finished turn
appends [the instruction ids] (see `prompts.ChatFormat`), computed by one extend pass (the prompt
and earlier turns are already cached); the next turn decodes. SamplingParams.turn2_n = m > 1 forks each
sample again after its instruction: m turn-2 branches over one cached turn 1. `stats` counts the tokens each phase
computed, so tests can prove a later turn recomputes nothing.
"""
from __future__ import annotations

import contextlib
import time

import torch

from score_train.prompts import MATH_SELF_CORRECT, ChatFormat, eos_ids_of
from score_train.rollout.block_manager import BlockManager
from score_train.rollout.runner import ModelRunner
from score_train.rollout.scheduler import Scheduler
from score_train.rollout.sequence import PromptGroup, Sequence, Status
from score_train.rollout.types import Episode, ExtraTurn, SamplingParams

__all__ = ["Engine", "branch_seed", "sample_seed"]

_M63 = (1 << 63) - 1


def sample_seed(base: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample; its draws depend only on this and the token position."""
    return ((base * 1000003 + prompt_index) * 1000003 + sample_index) & _M63


def branch_seed(seed: int, branch_index: int) -> int:
    """The seed of turn-2 branch j >= 1 of the sample with this seed (branch 0 keeps the sample's own, so it draws
    exactly as the unbranched sample would)."""
    return ((seed * 1000003 + 0x5EED) * 1000003 + branch_index) & _M63


class Engine:
    """Paged multi-turn generation on a model from score_train.model (same parameters, no copy).

    num_blocks: KV-cache blocks per layer; None sizes the pool to each call's worst case, capped by
    kv_cache_gb (default 2 GB on CPU, 40% of free memory on a GPU). max_batch_tokens caps the
    tokens of one forward (prompts longer than that are prefilled in chunks); max_num_seqs caps the
    live sequences. compute_dtype: sample with the weights (and the KV cache) in this dtype, e.g. bfloat16 over
    an fp32 policy (CausalLM.weights_as: cast once per call, the policy's tensors untouched); None = the model's.
    """

    PHASES = ("prompt_prefill", "turn1_decode", "turn2_extend", "turn2_decode")

    def __init__(self, model, tokenizer, *, block_size: int = 16, num_blocks: int | None = None,
                 max_batch_tokens: int | None = None, max_num_seqs: int | None = None,
                 kv_cache_gb: float | None = None, eos_token_ids=None, compute_dtype: torch.dtype | None = None):
        self.model, self.tokenizer = model, tokenizer  # tokenizer may be None for generate_ids
        self.compute_dtype = compute_dtype
        self.chat = ChatFormat(tokenizer) if tokenizer is not None else None
        self.block_size, self.fixed_blocks = block_size, num_blocks
        cpu = model.device.type == "cpu"
        self.max_batch_tokens = max_batch_tokens or (2048 if cpu else 16384)
        self.max_num_seqs = max_num_seqs or (256 if cpu else 1024)
        self.kv_cache_gb = kv_cache_gb
        self.eos_ids = set(eos_token_ids) if eos_token_ids is not None else eos_ids_of(model, tokenizer)
        self.runner = ModelRunner(model, block_size)
        self.block_manager = BlockManager(num_blocks or 1, block_size)  # resized to the pool by each call
        self.stats: dict[str, float] = {}

    @property
    def _dtype(self) -> torch.dtype:
        return self.compute_dtype or self.model.dtype

    @contextlib.contextmanager
    def own_dtype(self):
        """Sample in the model's own dtype for the duration, whatever compute_dtype says: the trainer's
        evaluations, so that before/after accuracies do not depend on the training rollouts' dtype."""
        saved, self.compute_dtype = self.compute_dtype, None
        try:
            yield self
        finally:
            self.compute_dtype = saved

    @property
    def num_blocks(self) -> int:
        return self.runner.num_blocks

    # -- KV budget ------------------------------------------------------------------------------
    def _budget_blocks(self) -> int:
        m = self.model
        per_block = 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * self._dtype.itemsize
        if self.kv_cache_gb is not None:
            budget = self.kv_cache_gb * 1e9
        elif m.device.type == "cuda":
            budget = 0.4 * torch.cuda.mem_get_info(m.device)[0]
        else:
            budget = 2e9
        return max(1, int(budget // per_block))

    def _worst_blocks(self, g: PromptGroup, max_new_tokens: int) -> int:
        """The most blocks a group can hold: its prompt once, then each sample's own turns and instructions
        (with turn-2 branches: a sample's turn 1 and instruction once, then each branch's turn 2)."""
        bs, turns, blocks = self.block_size, g.num_turns, self.block_manager.blocks_needed
        if g.branch_seeds:  # two turns; each branch's turn 2 may copy the shared tail block, then grow
            m = len(g.branch_seeds[0])
            shared = len(g.prompt_ids) + max_new_tokens + len(g.suffix) + 2 * bs
            per_child = blocks(shared) + m * blocks(max_new_tokens + 2 * bs)
        else:
            per_child = blocks(len(g.prompt_ids) + turns * max_new_tokens + (turns - 1) * len(g.suffix) + 2 * bs)
        return blocks(len(g.prompt_ids)) + g.n * per_child

    # -- public API -----------------------------------------------------------------------------
    def generate(self, prompts: list[str], params: SamplingParams, *, two_turn: bool = True,
                 instruction: str | list[str] | None = None, seeds: list[int] | None = None, progress=None,
                 num_turns: int | None = None, capture_layer: int = 0, reply_prefix: str | list[str] = "") -> list[Episode]:
        """Returns len(prompts) * params.n * params.turn2_n samples ordered by (prompt_index, sample_index,
        branch_index).
        seeds: optional per-sample seeds (len(prompts) * n), else derived from params.seed.
        num_turns: turns per sample (default 2, or 1 with two_turn=False); the instruction follows each
        turn but the last, and each later reply starts with reply_prefix (context, not the turn's text).
        capture_layer=k > 0: each sample carries `prefix_hidden`, the residual after
        layers [0, k) of its positions (a trainer whose bottom k layers are frozen then skips them)."""
        turns = num_turns or (2 if two_turn else 1)
        instruction = MATH_SELF_CORRECT if instruction is None else instruction
        prompt_ids = [self.chat.prompt_ids(p) for p in prompts]
        suffixes = self.chat.suffixes(prompts, instruction, reply_prefix) if turns > 1 else None
        return self.generate_ids(prompt_ids, params, suffixes=suffixes, seeds=seeds, progress=progress,
                                 num_turns=turns, capture_layer=capture_layer)

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams, *,
                     suffixes: list[list[int]] | None = None, seeds: list[int] | None = None,
                     progress=None, num_turns: int | None = None, capture_layer: int = 0) -> list[Episode]:
        """Token-level generate: suffixes[i] are the ids the chat template puts after a turn of prompt i
        (see ChatFormat.suffix_ids); None = one turn only. num_turns defaults to 2 with suffixes."""
        groups = self._groups(prompt_ids, params, suffixes, seeds, num_turns)
        sched = self._start(groups, params)
        t0 = time.perf_counter()
        # LoRA: one matmul per projection while sampling; then the sampling dtype (merged first, in fp32)
        with self.model.adapters_merged(), self.model.weights_as(self.compute_dtype):
            while not sched.is_finished():
                drawn = self.step(sched, params, capture_layer=capture_layer)
                if progress is not None:
                    progress(drawn)
        self.stats["seconds"] = time.perf_counter() - t0
        self.stats["generated"] = sum(len(t) for s in sched.finished for t in s.out_ids)
        self.block_manager.check([])
        return self._outputs(sched.finished, capture_layer)

    def step(self, sched: Scheduler, params: SamplingParams, *, capture_layer: int = 0) -> int:
        """One forward of the scheduled batch, then its draws. Returns the number of tokens drawn."""
        t = time.perf_counter()
        seqs, takes = sched.schedule()
        self._count_phases(seqs, takes)
        out = self.runner.run(seqs, takes, self.block_manager, capture_layer=capture_layer)
        tokens, logprobs = self.runner.sample(out, params)
        sched.postprocess(out.ready, tokens, logprobs)
        self.stats["steps"] += 1
        if len(takes) == sum(takes):  # a pure decode step (timed for the roofline report)
            self.stats["decode_steps"] += 1
            self.stats["decode_seconds"] += time.perf_counter() - t
            self.stats["decode_ctx_tokens"] += out.context_tokens
        return len(tokens)

    # -- internals ------------------------------------------------------------------------------
    def _groups(self, prompt_ids, params, suffixes, seeds, num_turns) -> list[PromptGroup]:
        n = params.n
        turns = num_turns or (2 if suffixes is not None else 1)
        if turns > 1 and suffixes is None:
            raise ValueError(f"num_turns={turns} needs suffixes (the ids between two turns)")
        if seeds is not None and len(seeds) != len(prompt_ids) * n:
            raise ValueError(f"seeds must have len(prompts) * n = {len(prompt_ids) * n} entries")
        if any(len(p) == 0 for p in prompt_ids):
            raise ValueError("empty prompt")
        m = params.turn2_n
        if m < 1 or (m > 1 and turns != 2):
            raise ValueError(f"turn2_n={m}: turn-2 branches need turn2_n >= 1 and two-turn rollouts (num_turns={turns})")
        groups = []
        for i, p in enumerate(prompt_ids):
            s = seeds[i * n:(i + 1) * n] if seeds is not None else [sample_seed(params.seed, i, j) for j in range(n)]
            branches = [[x] + [branch_seed(x, j) for j in range(1, m)] for x in s] if m > 1 else []
            groups.append(PromptGroup(i, list(p), list(suffixes[i]) if turns > 1 else [], list(s), turns, branches))
        return groups

    def _start(self, groups: list[PromptGroup], params: SamplingParams) -> Scheduler:
        """Size the KV pool, reset the allocator and queue every group."""
        for g in groups:
            g.reserved_blocks = self._worst_blocks(g, params.max_new_tokens)
        worst = max((g.reserved_blocks for g in groups), default=0)
        pool = self.fixed_blocks or min(sum(g.reserved_blocks for g in groups), self._budget_blocks())
        if worst > pool:
            raise ValueError(f"one prompt group needs up to {worst} KV blocks but the pool has {pool}: "
                             f"raise kv_cache_gb / num_blocks or lower max_new_tokens / n")
        self.runner.ensure_pool(max(pool, 1), self._dtype)
        self.block_manager.reset(self.runner.num_blocks)
        self.stats = {k: 0 for k in self.PHASES} | {"steps": 0, "generated": 0, "seconds": 0.0,
                                                     "decode_steps": 0, "decode_seconds": 0.0, "decode_ctx_tokens": 0}
        stop = tuple(params.stop or ())
        sched = Scheduler(self.block_manager, max_batch_tokens=self.max_batch_tokens, max_num_seqs=self.max_num_seqs,
                          eos_ids=self.eos_ids, max_new_tokens=params.max_new_tokens,
                          stop_hit=(lambda out: self._hit_stop(out, stop)) if stop else None)
        for g in groups:
            sched.add(g)
        return sched

    def _count_phases(self, seqs: list[Sequence], takes: list[int]) -> None:
        st = self.stats
        for s, take in zip(seqs, takes):
            if s.status is Status.PREFILL:
                st["prompt_prefill"] += take
                continue
            ext = max(0, min(s.extend_end, s.num_computed + take) - s.num_computed)
            t = s.turn + 1
            if ext:
                st[f"turn{t}_extend"] = st.get(f"turn{t}_extend", 0) + ext
            if take > ext:
                st[f"turn{t}_decode"] = st.get(f"turn{t}_decode", 0) + take - ext

    def _hit_stop(self, out: list[int], stop) -> bool:
        longest = max(len(x) for x in stop)
        # a stop string that ends in this token lies within its last few tokens' text
        tail = self.tokenizer.decode(out[-(longest + 4):], skip_special_tokens=False)
        return any(x in tail for x in stop)

    def _outputs(self, done: list[Sequence], capture_layer: int = 0) -> list[Episode]:
        dec = self.tokenizer.decode if self.tokenizer is not None else (lambda ids, **kw: "")
        res = []
        for s in sorted(done, key=lambda s: (s.group.index, s.sample_index, s.branch_index)):
            ids, lps, instr = s.out_ids, s.out_logprobs, s.instruction_ids
            two = len(ids) > 1
            res.append(Episode(
                prompt_index=s.group.index, sample_index=s.sample_index, prompt_ids=list(s.group.prompt_ids),
                turn1_ids=ids[0], turn1_logprobs=lps[0], turn1_text=dec(ids[0], skip_special_tokens=True),
                finish_reasons=s.finish_reasons, instruction_ids=instr[0] if two else [],
                turn2_ids=ids[1] if two else None, turn2_logprobs=lps[1] if two else None,
                turn2_text=dec(ids[1], skip_special_tokens=True) if two else None,
                extra_turns=[ExtraTurn(instr[t - 1], ids[t], lps[t], dec(ids[t], skip_special_tokens=True))
                             for t in range(2, len(ids))], branch_index=s.branch_index))
            if capture_layer:  # every position but the last drawn token (never run); algos.pack_samples checks it
                res[-1].prefix_hidden, res[-1].prefix_layer = torch.cat(s.captured).to(self.model.dtype), capture_layer
        return res
