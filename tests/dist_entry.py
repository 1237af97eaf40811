"""Test-only entry point for the torchrun tests (tests/test_distributed.py): `score-train`'s command line with the
test hooks injected in-process, never read from the environment by production code.

    python tests/dist_entry.py [--test.fail_rollout_rank=R] [score-train arguments ...]
    python -m torch.distributed.run --nproc_per_node=2 ... tests/dist_entry.py [...]

- the reward is a deterministic 0/1 hash of (record id, text), so a tiny random model gets non-zero advantages;
- --test.fail_rollout_rank=R raises in rank R right after its first rollout (the error barrier must end the job).
"""
import hashlib
import sys


def hash_reward(rec, text) -> float:
    return float(hashlib.md5(f"{rec.id}|{text}".encode()).digest()[0] % 2)


def main(argv) -> int:
    from score_train import train as T
    from score_train.commands.train import parse_args

    fail_rank, rest = None, []
    for a in argv:
        if a.startswith("--test.fail_rollout_rank="):
            fail_rank = int(a.split("=", 1)[1])
        else:
            rest.append(a)

    def fail(step, info):
        if info.rank == fail_rank:
            raise RuntimeError(f"injected rollout failure on rank {info.rank}")

    cfg, _ = parse_args(rest)
    T.train(cfg, reward_fn=hash_reward, rollout_hook=fail if fail_rank is not None else None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
