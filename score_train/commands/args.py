"""The command line every command parses, and the `--help` text built from the config schema.

    [--config FILE | --preset NAME] [--section.key=value | --section.key value | --alias ...] [--debug] [--help]

Short options (`Alias`) set one or more dotted keys. A text setting is taken as written ("Let me see: x" is not a
YAML mapping); any other value is read as a YAML scalar and checked against the field's type.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from score_train.config import PRESETS, UsageError
from score_train.config_io import build, field_type, preset_path, read_yaml, scalar


@dataclass
class Alias:
    """A short flag of a command: `--model X` sets model.spec (keys: every key it sets)."""
    keys: tuple[str, ...]
    const: object = None  # set: the flag takes no value (--two-turn)
    convert: Callable | None = None  # the raw string -> the value
    append: bool = False  # repeatable; each occurrence adds to a list (--stop A --stop B)
    help: str = ""


@dataclass
class Parsed:
    cfg: object
    flags: dict  # help, debug
    file_data: dict | None  # the YAML given with --config / --preset (None: none given)
    overrides: list[tuple[str, object]]  # (dotted key, value), in command-line order


class _Args:
    """argv as a queue: the next item, or the value of a `--name` flag (`--name=v` or `--name v`)."""

    def __init__(self, argv):
        self.items, self.i = list(argv or []), 0

    def __bool__(self):
        return self.i < len(self.items)

    def pop(self) -> str:
        self.i += 1
        return self.items[self.i - 1]

    def value(self, name: str, eq: str, raw: str) -> str:
        if eq:
            return raw
        if not self or self.items[self.i].startswith("--"):
            raise UsageError(f"--{name} needs a value")
        return self.pop()


def _alias_overrides(al: Alias, v, overrides: list, appended: dict) -> list:
    for key in al.keys:
        if al.append:
            appended.setdefault(key, []).append(v)
            overrides = [o for o in overrides if o[0] != key] + [(key, list(appended[key]))]
        else:
            overrides.append((key, v))
    return overrides


def parse_command(argv, cls, aliases: dict[str, Alias] | None = None, *, default_preset: str | None = None,
                  validate: bool = True) -> Parsed:
    """Parse a command line into a `cls` config (every command parses this way)."""
    aliases = aliases or {}
    args = _Args(argv)
    path = preset = None
    flags: dict = {}
    overrides: list[tuple[str, object]] = []
    appended: dict[str, list] = {}
    while args:
        a = args.pop()
        if a in ("-h", "--help", "--debug"):
            flags["debug" if a == "--debug" else "help"] = True
            continue
        if not a.startswith("--"):
            raise UsageError(f"unexpected argument {a!r} (settings look like --section.key=value)")
        name, eq, raw = a[2:].partition("=")
        if name == "config":
            path = args.value(name, eq, raw)
        elif name == "preset":
            preset = args.value(name, eq, raw)
        elif name in aliases:
            al = aliases[name]
            if al.const is not None and eq:
                raise UsageError(f"--{name} takes no value")
            v = al.const if al.const is not None else args.value(name, eq, raw)
            if al.const is None:
                v = al.convert(v) if al.convert else scalar(v)
            overrides = _alias_overrides(al, v, overrides, appended)
        else:
            tp = field_type(cls, name)
            if tp is None and "." not in name:
                known = ", ".join(sorted(aliases))
                raise UsageError(f"unknown option --{name}" + (f" (short options: {known})" if known else "")
                                 + "; settings look like --section.key=value")
            if tp is bool and not eq:
                v = True
            else:  # a text setting is taken as written
                v = args.value(name, eq, raw) if tp is str else scalar(args.value(name, eq, raw))
            overrides.append((name, v))
    if path and preset:
        raise UsageError("give --config or --preset, not both")
    if path and not os.path.exists(path) and path in PRESETS:
        preset, path = path, None
    explicit = path is not None or preset is not None
    if path is None and (preset or default_preset):
        path = preset_path(preset or default_preset)
    if flags.get("help"):
        return Parsed(None, flags, None, overrides)
    file_data = read_yaml(path) if path else None
    cfg = build(cls, file_data, overrides)
    if validate:
        cfg.validate()
    return Parsed(cfg, flags, file_data if explicit else None, overrides)


def usage(prog: str, cls, aliases: dict[str, Alias], head: str) -> str:
    """The help text: the command's own lines, its short options, then every setting of every section with its
    default and help (the schema's field metadata), grouped by section."""
    lines = [head.rstrip(), ""]
    if aliases:
        lines.append("short options:")
        for name, al in aliases.items():
            arg = "" if al.const is not None else " X"
            val = "" if al.const is None else "=" + str(al.const).lower()
            keys = ", ".join(f"--{k}{val}" for k in al.keys)
            lines.append(f"  --{name}{arg}".ljust(24) + f"= {keys}" + (f"  {al.help}" if al.help else ""))
        lines.append("")
    lines.append("settings (--section.key=value; default in brackets):")
    for sec in dataclasses.fields(cls):
        sec_cls = sec.default_factory
        lines.append(f"  {sec.name}: {(sec_cls.__doc__ or '').strip().splitlines()[0]}")
        for f in dataclasses.fields(sec_cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            name = f"    --{sec.name}.{f.name} [{_show(default)}]"
            lines += textwrap.wrap(f.metadata.get("help", ""), 116, initial_indent=name.ljust(40) + " ",
                                   subsequent_indent=" " * 41) if len(name) < 40 else \
                [name] + textwrap.wrap(f.metadata.get("help", ""), 116, initial_indent=" " * 41,
                                       subsequent_indent=" " * 41)
    lines.append("  --debug: show the traceback of an error")
    return "\n".join(lines)


def _show(v) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return repr(v) if isinstance(v, str) else str(v)


def run_command(prog: str, argv, parse: Callable, run: Callable, help_text: Callable[[], str], *,
                help_exits: bool) -> int:
    """Parse, print --help, or run; a `UsageError` prints one line on stderr and returns 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        cfg, flags = parse(argv)
        if flags.get("help"):
            print(help_text())
            if help_exits:  # as argparse does for score-eval / score-generate
                raise SystemExit(0)
            return 0
        return int(run(cfg) or 0)
    except UsageError as e:
        if debug:
            raise
        msg = " ".join(str(e).split("\n"))
        print(f"{prog}: error: {msg} (--help: usage, --debug: traceback)", file=sys.stderr)
        return 2
