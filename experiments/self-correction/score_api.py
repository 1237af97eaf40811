"""Every name these experiments take from outside this folder: score_train's Python API and the record provenance
of benchmarks/. Imported here only, so that when the library moves a name the fix is one line here."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # benchmarks/ (and an uninstalled score_train) import from the checkout
    sys.path.insert(0, ROOT)

from benchmarks.provenance import commit, machine
from score_train import checkpoint
from score_train.commands.args import parse_command
from score_train.config import Config, DataConfig, SamplingConfig, UsageError
from score_train.config_io import load_config, preset_path
from score_train.data import ArithmeticConfig, arithmetic, load_task
from score_train.eval import evaluate, self_correction_metrics, turn1_stated
from score_train.model import load_model
from score_train.preflight import load_records
from score_train.prompts import ARITHMETIC_SELF_CORRECT, ChatFormat, turn1_message
from score_train.rewards import reward, stated_answer, wrote_answer
from score_train.rollout.engine import Engine
from score_train.rollout.types import SamplingParams
from score_train.train import prepare_policy, train

__all__ = [
    "ARITHMETIC_SELF_CORRECT",
    "ROOT",
    "ArithmeticConfig",
    "ChatFormat",
    "Config",
    "DataConfig",
    "Engine",
    "SamplingConfig",
    "SamplingParams",
    "UsageError",
    "arithmetic",
    "checkpoint",
    "commit",
    "evaluate",
    "load_config",
    "load_model",
    "load_records",
    "load_task",
    "machine",
    "parse_command",
    "prepare_policy",
    "preset_path",
    "reward",
    "self_correction_metrics",
    "stated_answer",
    "train",
    "turn1_message",
    "turn1_stated",
    "wrote_answer",
]
