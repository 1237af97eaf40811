"""The comparison baseline: the same `Rollout` protocol on Hugging Face `generate`.

Turn 1 for all samples (left-padded batches), then turn 2 on the concatenated ids
prompt + y1 + instruction ids, exactly the layout the engine produces. Seeds are not per sample
here (HF draws from the global RNG, seeded once per call), so only greedy runs match the engine.
"""
from __future__ import annotations

import time

import torch

from score_train.prompts import MATH_SELF_CORRECT, ChatFormat, eos_ids_of
from score_train.rollout.types import SamplingParams, TwoTurnSample


class HFRollout:
    """model: a score_train.model.CausalLM (wrapped through `to_hf()`, sharing its parameters) or a
    transformers causal LM. batch_size: sequences per `generate` call."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64, eos_token_ids=None):
        self.source = model if hasattr(model, "forward_paged") else None
        self.hf = model.to_hf() if self.source is not None else model
        self.tokenizer = tokenizer  # may be None for generate_ids
        self.chat = ChatFormat(tokenizer) if tokenizer is not None else None
        self.batch_size = batch_size
        self.eos_ids = set(eos_token_ids) if eos_token_ids is not None else eos_ids_of(self.hf, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else min(self.eos_ids, default=0)
        self.stats: dict[str, float] = {}

    def generate(self, prompts: list[str], params: SamplingParams, *, two_turn: bool = True,
                 instruction: str | None = None, reply_prefix: str = "") -> list[TwoTurnSample]:
        instruction = MATH_SELF_CORRECT if instruction is None else instruction
        prompt_ids = [self.chat.prompt_ids(p) for p in prompts]
        suffixes = [self.chat.suffix_ids(p, instruction, reply_prefix) for p in prompts] if two_turn else None
        return self.generate_ids(prompt_ids, params, suffixes=suffixes)

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams, *,
                     suffixes: list[list[int]] | None = None) -> list[TwoTurnSample]:
        if params.turn2_n != 1:
            raise ValueError(f"turn2_n={params.turn2_n}: turn-2 branches need the paged engine (rollout.engine=engine)")
        t0 = time.perf_counter()
        if self.source is not None and self.source.has_lora:  # to_hf merged copies: take the current adapters
            self.hf = self.source.to_hf()
        self._forward_tokens = 0
        torch.manual_seed(params.seed)
        n = params.n
        keys = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
        ctx1 = [list(prompt_ids[i]) for i, _ in keys]
        t1 = self._run(ctx1, params)
        t2 = None
        instr = [[] for _ in keys]
        if suffixes is not None:
            instr = [ChatFormat.instruction_ids(suffixes[i], t1[k][0], self.eos_ids) for k, (i, _) in enumerate(keys)]
            t2 = self._run([ctx1[k] + t1[k][0] + instr[k] for k in range(len(keys))], params)
        dec = self.tokenizer.decode if self.tokenizer is not None else (lambda ids, **kw: "")
        out = []
        for k, (i, j) in enumerate(keys):
            ids1, lp1, r1 = t1[k]
            s = TwoTurnSample(prompt_index=i, sample_index=j, prompt_ids=list(prompt_ids[i]), turn1_ids=ids1,
                              turn1_logprobs=lp1, turn1_text=dec(ids1, skip_special_tokens=True),
                              finish_reasons=[r1], instruction_ids=instr[k])
            if t2 is not None:
                ids2, lp2, r2 = t2[k]
                s.turn2_ids, s.turn2_logprobs, s.turn2_text = ids2, lp2, dec(ids2, skip_special_tokens=True)
                s.finish_reasons.append(r2)
            out.append(s)
        self.stats = {"seconds": time.perf_counter() - t0,
                      "generated": sum(len(s.turn1_ids) + len(s.turn2_ids or []) for s in out),
                      "forward_tokens": self._forward_tokens}  # padded positions the model ran on
        return out

    def _run(self, contexts: list[list[int]], params: SamplingParams):
        """One turn for every context: [(ids, logprobs, finish_reason)]."""
        dev = self.hf.device
        greedy = params.temperature <= 0
        kw = {"max_new_tokens": params.max_new_tokens, "do_sample": not greedy, "eos_token_id": sorted(self.eos_ids) or None,
                  "pad_token_id": self.pad_id, "return_dict_in_generate": True, "output_logits": True}
        if not greedy:
            kw.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        res = []
        for a in range(0, len(contexts), self.batch_size):
            chunk = contexts[a:a + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.tensor([[self.pad_id] * (width - len(c)) + c for c in chunk], device=dev)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=dev)
            g = self.hf.generate(input_ids=ids, attention_mask=mask, **kw)
            new = g.sequences[:, width:]
            self._forward_tokens += len(chunk) * (width + new.shape[1] - 1)
            logits = torch.stack(g.logits, 1).float()  # [B, steps, V]
            if not greedy:
                logits = logits / params.temperature
            lp = torch.log_softmax(logits, -1).gather(2, new[:, :logits.shape[1], None]).squeeze(2)
            for r in range(len(chunk)):
                toks = new[r].tolist()
                reason = "length"
                end = len(toks)
                for t, tok in enumerate(toks):
                    if tok in self.eos_ids:
                        end, reason = t + 1, "eos"
                        break
                if params.stop:
                    end, reason = self._stop(toks[:end], params.stop, end, reason)
                res.append((toks[:end], lp[r, :end].tolist(), reason))
        return res

    def _stop(self, toks, stop, end, reason):
        for t in range(len(toks)):
            tail = self.tokenizer.decode(toks[max(0, t + 1 - max(map(len, stop)) - 4):t + 1])
            if any(s in tail for s in stop):
                return t + 1, "stop"
        return end, reason
