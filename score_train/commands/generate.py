"""score-generate: sample (two-turn) completions for a JSONL file of {"prompt": ...} lines."""
from __future__ import annotations

import json
import os
import sys
import tempfile

import torch
from tqdm import tqdm

from score_train import model as modeling
from score_train import trained_settings
from score_train.commands.args import Alias, parse_command, run_command, usage
from score_train.commands.eval import SHARED, with_trained_settings
from score_train.config import GenerateCommandConfig, UsageError, resolve
from score_train.preflight import check_device, check_model
from score_train.prompts import self_correction_instruction
from score_train.rollout.engine import Engine
from score_train.rollout.types import SamplingParams

USAGE = """usage: score-generate --model PATH|embedded --input prompts.jsonl --output out.jsonl [--n N] [--two-turn]
                      [--temperature T] [--top-p P] [--top-k K] [--max-new-tokens M] [--instruction TEXT]
                      [--seed S] [--stop STR ...] [--section.key=value ...]

Samples (two-turn) completions for a JSONL file of {"prompt": ...} lines.
Example:
  score-generate --model embedded --input prompts.jsonl --output out.jsonl --two-turn --n 4"""

ALIASES = {
    **SHARED,
    "input": Alias(("generate.input",)),
    "output": Alias(("generate.output",)),
    "n": Alias(("rollout.n",)),
    "top-p": Alias(("rollout.top_p",)),
    "top-k": Alias(("generate.top_k",)),
    "two-turn": Alias(("generate.two_turn",), const=True),
    "seed": Alias(("run.seed",)),
    "stop": Alias(("generate.stop",), convert=str, append=True),
}


def read_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{no}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f"{path}:{no}: expected an object with a string \"prompt\" field")  # noqa: TRY004
            prompts.append(obj["prompt"])
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def write_atomic(path: str, lines) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".score-generate-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for obj in lines:
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the output is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def parse_args(argv) -> tuple[GenerateCommandConfig, dict]:
    """The command line, over the turn-2 settings a trained model directory carries (trained_settings)."""
    p = parse_command(argv, GenerateCommandConfig, ALIASES, validate=False)
    if p.cfg is not None:
        keys = {k: v for k, v in trained_settings.KEYS.items() if v.startswith("rollout.")}
        p = with_trained_settings(p, GenerateCommandConfig, "score-generate", keys)
    return p.cfg, p.flags


def generate(cfg: GenerateCommandConfig, prompts: list[str]) -> int:
    """score-generate on checked inputs: cfg is resolved and prompts are read."""
    g, r = cfg.generate, cfg.rollout
    device = cfg.run.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    model, tok = modeling.load_model(cfg.model.spec, dtype=getattr(torch, cfg.model.dtype), device=device)
    engine = Engine(model, tok)
    params = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, top_k=g.top_k,
                            max_new_tokens=r.max_new_tokens, stop=tuple(g.stop), seed=cfg.run.seed)
    instruction = self_correction_instruction(g.kind, r.style, r.instruction)
    print(f"score-generate: {len(prompts)} prompts x {r.n}, T={r.temperature:g}, top_p={r.top_p:g}, "
          f"{r.max_new_tokens} new tokens per turn{', two turns' if g.two_turn else ''}", file=sys.stderr)
    bar = tqdm(total=len(prompts) * r.n * r.max_new_tokens * (2 if g.two_turn else 1), unit="tok",
               desc="generating", file=sys.stderr, dynamic_ncols=True, disable=not cfg.run.progress)
    samples = engine.generate(prompts, params, two_turn=g.two_turn, instruction=instruction, progress=bar.update,
                              reply_prefix=r.reply_prefix)
    bar.close()
    write_atomic(g.output, ({"prompt_index": s.prompt_index, "sample_index": s.sample_index,
                             "turn1": s.turn1_text, "turn2": s.turn2_text if g.two_turn else None,
                             "turn1_token_ids": s.turn1_ids,
                             "turn2_token_ids": s.turn2_ids if g.two_turn else None,
                             "finish_reasons": s.finish_reasons} for s in samples))
    st = engine.stats
    print(f"score-generate: {len(samples)} samples, {st['generated']} tokens in {st['seconds']:.1f}s "
          f"({st['generated'] / max(st['seconds'], 1e-9):.1f} tok/s) -> {g.output}", file=sys.stderr)
    return 0


def _run(cfg: GenerateCommandConfig) -> int:
    check_model(cfg.model.spec)
    check_device(cfg.run.device)
    try:
        prompts = read_prompts(cfg.generate.input)
    except (OSError, ValueError) as e:
        raise UsageError(f"generate.input: {e}") from None
    return generate(resolve(cfg, cfg.generate.kind), prompts)


def main(argv=None) -> int:
    return run_command("score-generate", argv, parse_args, _run,
                       lambda: usage("score-generate", GenerateCommandConfig, ALIASES, USAGE), help_exits=True)


if __name__ == "__main__":
    sys.exit(main())
