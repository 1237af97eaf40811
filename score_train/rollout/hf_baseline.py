"""The comparison baseline: the same `Rollout` protocol on Hugging Face `generate`.

Turn 1 for all samples (left-padded batches), then each later turn on the concatenated ids
prompt + y1 + instruction ids (+ y2 + instruction ids ...), exactly the layout the engine produces. HF draws from
the global RNG: seeded once per call from params.seed, or, with per-sample `seeds`, once per sample (one sequence a
`generate` call, slower); only greedy runs match the engine token for token.
"""
from __future__ import annotations

import contextlib
import time

import torch

from score_train.prompts import MATH_SELF_CORRECT, ChatFormat, eos_ids_of
from score_train.rollout.types import Episode, ExtraTurn, SamplingParams


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

    @property
    def model(self):
        """The CausalLM sampled (None for a plain transformers model)."""
        return self.source

    def own_dtype(self):
        return contextlib.nullcontext(self)  # HF samples the model as it is

    def generate(self, prompts: list[str], params: SamplingParams, *, two_turn: bool = True,
                 instruction: str | list[str] | None = None, reply_prefix: str | list[str] = "", num_turns: int | None = None,
                 seeds: list[int] | None = None, progress=None, capture_layer: int = 0) -> list[Episode]:
        turns = num_turns or (2 if two_turn else 1)
        instruction = MATH_SELF_CORRECT if instruction is None else instruction
        prompt_ids = [self.chat.prompt_ids(p) for p in prompts]
        suffixes = self.chat.suffixes(prompts, instruction, reply_prefix) if turns > 1 else None
        return self.generate_ids(prompt_ids, params, suffixes=suffixes, num_turns=turns, seeds=seeds,
                                 progress=progress, capture_layer=capture_layer)

    @torch.inference_mode()
    def generate_ids(self, prompt_ids: list[list[int]], params: SamplingParams, *,
                     suffixes: list[list[int]] | None = None, num_turns: int | None = None,
                     seeds: list[int] | None = None, progress=None, capture_layer: int = 0) -> list[Episode]:
        if params.turn2_n != 1:
            raise ValueError(f"turn2_n={params.turn2_n}: turn-2 branches need the paged engine (rollout.engine=engine)")
        turns = num_turns or (2 if suffixes is not None else 1)
        if turns > 1 and suffixes is None:
            raise ValueError(f"num_turns={turns} needs suffixes (the ids between two turns)")
        n = params.n
        if seeds is not None and len(seeds) != len(prompt_ids) * n:
            raise ValueError(f"seeds must have len(prompts) * n = {len(prompt_ids) * n} entries")
        if capture_layer and self.source is None:
            raise ValueError("capture_layer needs a score_train CausalLM (a transformers model has no layer cut)")
        t0 = time.perf_counter()
        if self.source is not None and self.source.has_lora:  # to_hf merged copies: take the current adapters
            self.hf = self.source.to_hf()
        self._forward_tokens = 0
        torch.manual_seed(params.seed)
        keys = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
        ctx = [list(prompt_ids[i]) for i, _ in keys]
        outs, instrs = [], []  # per turn: [(ids, logprobs, reason)] and the ids before it
        for t in range(turns):
            if t:
                instrs.append([ChatFormat.instruction_ids(suffixes[i], outs[-1][k][0], self.eos_ids)
                               for k, (i, _) in enumerate(keys)])
                ctx = [ctx[k] + outs[-1][k][0] + instrs[-1][k] for k in range(len(keys))]
            outs.append(self._run(ctx, params, seeds))
            if progress is not None:
                progress(sum(len(o[0]) for o in outs[-1]))
        dec = self.tokenizer.decode if self.tokenizer is not None else (lambda ids, **kw: "")
        out = []
        for k, (i, j) in enumerate(keys):
            ids1, lp1, r1 = outs[0][k]
            s = Episode(prompt_index=i, sample_index=j, prompt_ids=list(prompt_ids[i]), turn1_ids=ids1,
                              turn1_logprobs=lp1, turn1_text=dec(ids1, skip_special_tokens=True),
                              finish_reasons=[r1], instruction_ids=instrs[0][k] if turns > 1 else [])
            if turns > 1:
                ids2, lp2, r2 = outs[1][k]
                s.turn2_ids, s.turn2_logprobs, s.turn2_text = ids2, lp2, dec(ids2, skip_special_tokens=True)
                s.finish_reasons.append(r2)
            for t in range(2, turns):
                ids_t, lp_t, r_t = outs[t][k]
                s.extra_turns.append(ExtraTurn(instrs[t - 1][k], ids_t, lp_t, dec(ids_t, skip_special_tokens=True)))
                s.finish_reasons.append(r_t)
            if capture_layer:
                self._capture(s, capture_layer)
            out.append(s)
        self.stats = {"seconds": time.perf_counter() - t0,
                      "generated": sum(len(x) for s in out for x in s.turn_tokens),
                      "forward_tokens": self._forward_tokens}  # padded positions the model ran on
        return out

    def _capture(self, s: Episode, layer: int) -> None:
        """The residual after layers [0, layer) at every position but the last, as the engine captures it."""
        ids = s.full_ids()[:-1]
        dev = self.source.device
        x = torch.tensor(ids, device=dev)
        cu = torch.tensor([0, len(ids)], dtype=torch.int32, device=dev)
        s.prefix_hidden = self.source(x, torch.arange(len(ids), device=dev), cu, to_layer=layer)
        s.prefix_layer = layer

    def _run(self, contexts: list[list[int]], params: SamplingParams, seeds=None):
        """One turn for every context: [(ids, logprobs, finish_reason)]. With per-sample seeds, one context a
        `generate` call, each after seeding the global RNG with its sample's seed."""
        dev = self.hf.device
        greedy = params.temperature <= 0
        kw = {"max_new_tokens": params.max_new_tokens, "do_sample": not greedy, "eos_token_id": sorted(self.eos_ids) or None,
                  "pad_token_id": self.pad_id, "return_dict_in_generate": True, "output_logits": True}
        if not greedy:
            kw.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        step = 1 if seeds is not None else self.batch_size
        res = []
        for a in range(0, len(contexts), step):
            chunk = contexts[a:a + step]
            if seeds is not None:
                torch.manual_seed(seeds[a])
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
