"""Test set-up for this experiment's tests: its scripts import as top-level modules (this folder on sys.path, the
checkout for `tests.helpers`), and without a GPU Triton kernels run under the CPU interpreter (as in tests/)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (HERE, os.path.dirname(os.path.dirname(HERE))):
    if path not in sys.path:
        sys.path.insert(0, path)

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
