"""Configs from YAML and `section.key` overrides, saved configs, and the rules of a resumed run.

    cfg = load_config("my.yaml", ["--optim.lr=1e-6", "--algo.name=multi-turn-rl"])   # the Python API
    build(EvalCommandConfig, read_yaml(path), [("data.eval_size", 64)])

Values are YAML scalars checked against the field's declared type (`score_train.config`); an unknown key, a wrong
type or a value of another command's section is a `UsageError` naming the key.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import typing
from importlib import resources

import yaml

from score_train.config import PRESETS, Config, SamplingConfig, UsageError

# Keys renamed since older configs were saved: still read, with a note.
RENAMED = {"optim.beta1": "optim.adam_beta1", "optim.beta2": "optim.adam_beta2"}

# What may differ when a run is resumed: how it runs and reports, never what it computes.
RESUME_SAFE = frozenset({
    "run.threads", "run.progress", "run.device", "run.save_every", "run.keep_checkpoints", "run.export",
    "run.tensorboard", "run.wandb", "run.resume", "eval.every", "eval.before", "eval.sample_rows",
    "dist.timeout_s", "dist.activation_checkpointing", "dist.shard_ref",
})
RUN_IDENTITY = frozenset({"run.name", "run.out_dir"})  # they name the run directory, so they never differ

_OTHER_SECTIONS = frozenset(f.name for f in dataclasses.fields(Config))


def _coerce(value, tp, key: str, sep: str = ","):
    """Check / convert a YAML value to the field's declared type (sep: a list's separator in one string)."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            # ","-lists are trimmed; other separators keep each item's spaces (a reply opening ends in one)
            value = [v.strip() if sep == "," else v for v in value.split(sep) if v.strip()]
            if item_tp in (int, float):  # "2,1" from the command line: each item as YAML reads it
                value = [yaml.safe_load(v) for v in value]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UsageError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise UsageError(f"{key}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-6" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        return value if isinstance(value, str) else str(value)
    raise TypeError(f"{key}: unsupported field type {tp}")


def _renamed(data: dict, prefix: str) -> dict:
    out = dict(data)
    for old, new in RENAMED.items():
        sec, o = old.rsplit(".", 1)
        n = new.rsplit(".", 1)[1]
        if prefix == sec + "." and o in out:
            if n in out:
                raise UsageError(f"{old} and {new} are both given: {old} is the old name of {new}; keep {new}")
            print(f"score: config key {old} is now {new} (Adam's coefficient; algo.beta1/beta2 are the KL "
                  f"coefficients); read as {new}", file=sys.stderr)
            out[n] = out.pop(o)
    return out


def _apply(obj, data: dict, prefix: str = "", *, from_file: bool = False):
    """Set obj's fields from a (nested) mapping. from_file: a saved or shared YAML file, which may hold other
    commands' sections and score-train's training-only rollout keys; those are skipped there, refused elsewhere."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    training_only = SamplingConfig.TRAINING_ONLY if type(obj) is SamplingConfig else {}
    for k, v in _renamed(data, prefix).items():
        key = f"{prefix}{k}"
        if k not in names:
            if from_file and ((not prefix and k in _OTHER_SECTIONS) or k in training_only):
                continue
            if k in training_only:
                raise UsageError(training_only[k])
            raise UsageError(f"unknown config key {key!r} (known: {', '.join(sorted(prefix + n for n in names))})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            if not isinstance(v, dict):
                raise UsageError(f"{key}: expected a mapping")
            _apply(cur, v, key + ".", from_file=from_file)
        else:
            sep = next(f.metadata.get("sep", ",") for f in dataclasses.fields(obj) if f.name == k)
            setattr(obj, k, _coerce(v, hints[k], key, sep))


def nested(key: str, value) -> dict:
    """{"a.b": v} -> {"a": {"b": v}}."""
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def scalar(raw: str):
    """A command-line value read as a YAML scalar ("3e-6" -> 3e-06, "true" -> True)."""
    if raw == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def field_type(cls, key: str):
    """The declared type of a dotted key of a config class, or None when there is no such key."""
    tp = cls
    try:
        for part in key.split("."):
            tp = typing.get_type_hints(tp)[part]
    except (KeyError, TypeError):
        return None
    return tp


def read_yaml(path: str, what: str = "--config") -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"{what}: no such file: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise UsageError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the top level must be a mapping")
    return data


def preset_path(name: str) -> str:
    """score_train/configs/<name>.yaml, the package's own copy (works from an installed wheel)."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return str(resources.files("score_train") / "configs" / f"{name}.yaml")


def build(cls, file_data: dict | None = None, overrides: list[tuple[str, object]] = (), base=None):
    """cls() (or a copy of `base`) with the YAML mapping and then each (dotted key, value) applied, in order."""
    cfg = cls() if base is None else _copy(base)
    if file_data:
        _apply(cfg, file_data, from_file=True)
    for key, value in overrides:
        _apply(cfg, nested(key, value))
    return cfg


def _copy(cfg):
    out = type(cfg)()
    _apply(out, dataclasses.asdict(cfg))
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """score-train's config from a YAML file and `--section.key=value` strings (the Python API)."""
    pairs = []
    for item in overrides or []:
        if not item.startswith("--") or "=" not in item:
            raise UsageError(f"override {item!r} must look like --section.key=value")
        key, raw = item[2:].split("=", 1)
        pairs.append((key, raw if field_type(Config, key) is str else scalar(raw)))
    return build(Config, read_yaml(path) if path else None, pairs).validate()


def dump_config(cfg) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def flat(cfg) -> dict:
    """{"section.key": value} of a config."""
    return {f"{s}.{k}": v for s, sec in cfg.to_dict().items() for k, v in sec.items()}


def merge_resume(saved: Config, given: Config, where: str) -> tuple[Config, list[str]]:
    """The config a resumed run continues with: the run's own saved config, with the `given` values only
    where they are safe (RESUME_SAFE). Returns (config, ["key: old -> new", ...]); any other difference
    is refused, since it would change what the run computes."""
    a, b = flat(saved), flat(given)
    changed = [k for k in b if k not in RUN_IDENTITY and a.get(k) != b[k]]
    bad = [k for k in changed if k not in RESUME_SAFE]
    if bad:
        diffs = ", ".join(f"{k} ({a.get(k)!r} -> {b[k]!r})" for k in bad)
        raise UsageError(f"cannot resume {where} with {diffs}: a resumed run keeps its own config.yaml; only "
                         f"{', '.join(sorted(RESUME_SAFE - {'run.resume'}))} may change. Start a new run "
                         "(another --run.name) to change the others")
    merged = _copy(saved)
    for k in changed:
        _apply(merged, nested(k, b[k]))
    merged.run.resume = True
    return merged.validate(), [f"{k}: {a.get(k)!r} -> {b[k]!r}" for k in changed if k != "run.resume"]


def resume_request(cfg: Config, saved: Config) -> Config:
    """What a resume asks for: `saved` with the keys the command line gave (all of cfg when it did not come
    from the command line, e.g. `train(cfg)` from Python)."""
    keys = getattr(cfg, "cli_keys", None)
    if keys is None:
        return cfg
    values = flat(cfg)
    return build(Config, None, [(k, values[k]) for k in sorted(keys) if k in values], base=saved)


def load_saved_config(run_dir: str) -> Config:
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise UsageError(f"nothing to resume: {path} does not exist (check --run.name / --run.out_dir, or drop "
                         "--resume to start the run)")
    return build(Config, read_yaml(path, "the run's config.yaml"))
