"""Imports a peer package's module for the oracle tests, or skips the calling test with the reason.

The peers come from the optional `peers` extra (scripts/setup.sh installs it); they are oracles only, never
imported by score_kernels itself."""
import importlib

import pytest


def need(module: str):
    """The peer module, or a skip naming what is missing (a peer that lacks one of its own imports skips
    with that import's name, so the reason says which dependency the extra is missing)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:  # ModuleNotFoundError included
        pytest.skip(f"{module} not importable: {e}")
