#!/usr/bin/env bash
# The GPU run (issue 15): one device `run` call executes this from the repo root, end to end, and
# finds every result under $OUT. bench/gpu/README.md has the exact call.
#
#   bash bench/gpu/run.sh                     # on the device: .whl carried, true-size models
#   GPU_RUN_SCALE=small bash bench/gpu/run.sh # the CPU rehearsal: small models, device cpu
#
# Environment:
#   OUT               where results go (the device sets it; default ./gpu-out)
#   GPU_RUN_BUDGET_S  seconds for the whole run, install included (default 480); stages that
#                     cannot fit what is left are skipped and listed as such
#   GPU_RUN_STAGES    comma-separated stage names to run (default: all, in priority order)
#   GPU_RUN_SCALE     true (default: the device) or small (CPU rehearsal)
#   GPU_RUN_WHEELS    folder of wheels to install first (default .whl; "none": install nothing)
#   GPU_RUN_SITE      where they are installed (default /tmp/site)
#   GPU_RUN_COMMIT    the commit being run (the device copy has no .git; pass it in the command)
#   PYTHON            the interpreter (default python3: on the device, the one with torch)
set -uo pipefail
cd "$(dirname "$0")/../.."
export GPU_RUN_T0=${GPU_RUN_T0:-$(date +%s.%N)}
export OUT=${OUT:-$PWD/gpu-out}
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_RUN_WHEELS:-.whl}
SITE=${GPU_RUN_SITE:-/tmp/site}
mkdir -p "$OUT"

{
  echo "== fluxserve GPU run: scale ${GPU_RUN_SCALE:-true}, budget ${GPU_RUN_BUDGET_S:-480} s, out $OUT"
  if [ "$WHEELS" != none ]; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
      echo "no wheels in $WHEELS: carry .whl (bash bench/gpu/wheels.sh makes it) or set GPU_RUN_WHEELS=none"
      exit 3
    fi
    started=$(date +%s)
    rm -rf "$SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || { echo "installing the wheels failed"; exit 3; }
    echo "== installed $(ls "$WHEELS"/*.whl | wc -l) wheels into $SITE in $(( $(date +%s) - started )) s"
    export PYTHONPATH="$SITE:$PWD/src:$PWD"
  else
    export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  "$PYTHON" -m bench.gpu.run
} 2>&1 | tee "$OUT/run.log"
exit "${PIPESTATUS[0]}"
