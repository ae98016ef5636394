#!/usr/bin/env bash
# The GPU benchmark in one call on a bare GPU host (Python 3.12 with torch, transformers and
# accelerate, no diffusers/PyAV): install the wheels that scripts/fetch_gpu_wheels.sh fetched,
# run scripts/bench.py within a budget, print its markdown table last.
#
#   scripts/gpu_run.sh [WHEEL_DIR] [bench.py options...]     # WHEEL_DIR default .whl
#
# Environment: OUT (results folder; default bench-out), BUDGET_S (default 480: the bench
# skips what would not fit). bench.py is stopped (SIGINT) 90 s past the budget, so the table
# of what finished is still printed inside a 10-minute call. The wheels go into /tmp/site with
# --no-deps (SITE_DIR to change that), first on PYTHONPATH: the host's own torch and friends are left as they are.
set -uo pipefail

wheels="${1:-.whl}"
shift || true
out="${OUT:-bench-out}"
budget="${BUDGET_S:-480}"
site="${SITE_DIR:-/tmp/site}"  # where the wheels are installed
mkdir -p "$out"

if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
  echo "No wheels in $wheels: run scripts/fetch_gpu_wheels.sh $wheels where PyPI is reachable." >&2
  exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$site" "$wheels"/*.whl || exit 1
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
python3 -c 'import torch, diffusers, transformers, av; print("torch", torch.__version__, "cuda",
torch.version.cuda, "| diffusers", diffusers.__version__, "| transformers", transformers.__version__,
"| av", av.__version__)' || exit 1

timeout --signal=INT --kill-after=20 "$((${budget%.*} + 90))" \
  python3 scripts/bench.py --out "$out" --budget-s "$budget" "$@" >"$out/bench.log" 2>&1
rc=$?
echo "bench.py exit status $rc (log: $out/bench.log)"
if [ "$rc" -ne 0 ]; then
  tail -40 "$out/bench.log"
fi
cat "$out/bench.md" 2>/dev/null || echo "no bench.md written"
exit "$rc"
