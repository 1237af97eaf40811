"""score-generate: sample (two-turn) completions for a JSONL file of prompts.

    score-generate --model PATH|embedded --input prompts.jsonl --output out.jsonl [--n N]
                   [--temperature T] [--top-p P] [--top-k K] [--max-new-tokens M] [--two-turn]
                   [--instruction TEXT] [--seed S] [--stop STR ...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def read_prompts(path: str) -> list[str]:
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="score-generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="local HF directory, .gguf file, or 'embedded' (SmolLM2-135M)")
    p.add_argument("--input", required=True, help="JSONL, one {\"prompt\": ...} per line")
    p.add_argument("--output", required=True)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=256, help="per turn")
    p.add_argument("--two-turn", action="store_true")
    p.add_argument("--instruction", default=None, help="turn-2 instruction (default: SCoRe's math instruction)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on GPU, float32 on CPU")
    args = p.parse_args(argv)
    if args.n < 1 or args.max_new_tokens < 1:
        p.error("--n and --max-new-tokens must be positive")
    try:
        prompts = read_prompts(args.input)
    except (OSError, ValueError) as e:
        print(f"score-generate: {e}", file=sys.stderr)
        return 2

    import torch
    from tqdm import tqdm

    from score_train.model import load_model
    from score_train.rollout.engine import Engine
    from score_train.rollout.types import SamplingParams

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    model, tok = load_model(args.model, dtype=dtype, device=device)
    engine = Engine(model, tok)
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, stop=tuple(args.stop), seed=args.seed)
    bar = tqdm(total=len(prompts) * args.n * args.max_new_tokens * (2 if args.two_turn else 1), unit="tok",
               desc="generating", file=sys.stderr, dynamic_ncols=True)
    samples = engine.generate(prompts, params, two_turn=args.two_turn, instruction=args.instruction,
                              progress=bar.update)
    bar.close()
    write_atomic(args.output, ({"prompt_index": s.prompt_index, "sample_index": s.sample_index,
                                "turn1": s.turn1_text, "turn2": s.turn2_text if args.two_turn else None,
                                "turn1_token_ids": s.turn1_ids,
                                "turn2_token_ids": s.turn2_ids if args.two_turn else None,
                                "finish_reasons": s.finish_reasons} for s in samples))
    st = engine.stats
    print(f"score-generate: {len(samples)} samples, {st['generated']} tokens in {st['seconds']:.1f}s "
          f"({st['generated'] / max(st['seconds'], 1e-9):.1f} tok/s) -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
