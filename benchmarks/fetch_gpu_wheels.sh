#!/usr/bin/env bash
# Fetch the pure-Python wheels the GPU check wants but the GPU machine lacks (it has no network):
# galore-torch 1.0 (the comparison column of the step benchmarks). Run here, from the repo root,
# before a device call; the call then names `.whl` in `carry` and benchmarks/gpu_check.sh installs
# what it finds there (pip --no-index --no-deps --target /tmp/site, then PYTHONPATH=/tmp/site).
#
#   bash benchmarks/fetch_gpu_wheels.sh          # -> .whl/galore_torch-1.0-py3-none-any.whl
#
# .whl/ is kept out of git through .git/info/exclude (added here if missing), so it travels only
# when carried. galore-torch's own requirements (torch, transformers, bitsandbytes) are NOT fetched:
# torch and transformers are on the GPU machine, and the benchmarks import galore_torch.adamw without
# the package __init__ that needs bitsandbytes.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"

mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "galore-torch==1.0"

# One version of each package: two would stop the install on the GPU machine.
ls .whl/*.whl
dups=$(ls .whl/*.whl | sed 's#.*/##; s/-.*//' | tr 'A-Z' 'a-z' | sort | uniq -d)
if [ -n "$dups" ]; then echo "more than one wheel of: $dups (remove the extra ones)" >&2; exit 1; fi
for w in .whl/*.whl; do
    echo "$w requires (not fetched):"
    unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v extra || true
done
git check-ignore -q .whl/ && echo ".whl/ is git-ignored (carry it: carry=[\".whl\"])"
