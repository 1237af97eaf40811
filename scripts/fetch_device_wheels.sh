#!/usr/bin/env bash
# Downloads, here, the wheels scripts/device_check.sh installs on the GPU machine (Python 3.12,
# x86-64 Linux, no internet there) into .whl/ (git-ignored; carried with the device call).
#
# --no-deps: pip resolves nothing, so every needed package is named below. Both peers need only torch
# and triton, which the device image has (torch 2.11, triton 3.6); see docs/perf-regression.md.
# Left out on purpose:
#   flash-attn          PyPI has only a source distribution (no wheel for torch 2.11 / py3.12); the
#                       device cannot build it in the time of a run.
#   liger-cute-kernels  Liger's CuTe path (extra "lck"): its wheel alone is 81 MB, over the 64 MiB a
#                       device call may carry.
# Usage: bash scripts/fetch_device_wheels.sh [DEST]   (default .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
# The device tool carries .whl; keep it out of git (CONTRIBUTING.md's recipe; .gitignore has /.whl/ too).
if [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
  echo /.whl/ >>.git/info/exclude
fi
WHEELS=(
  liger-kernel==0.8.5
  cut-cross-entropy==25.1.1
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
for w in "${WHEELS[@]}"; do
  name=${w%%==*}
  # one version of each package: two in .whl stop the whole install on the device
  rm -f "$DEST/${name//-/_}"-*.whl
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$w"
done
# every requirement of what was fetched, so a new version's new dependency is seen here, not there
for f in "$DEST"/*.whl; do
  echo "$(basename "$f") $(du -k "$f" | cut -f1) KiB; requires: $(unzip -p "$f" '*/METADATA' \
    | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/Requires-Dist: //' | tr '\n' ' ')"
done
echo "total: $(du -ck "$DEST"/*.whl | tail -1 | cut -f1) KiB (a device call carries at most 64 MiB)"
