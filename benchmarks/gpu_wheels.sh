#!/usr/bin/env bash
# Download, on this CPU machine (which reaches PyPI), the wheels that the GPU image lacks, into the
# repo's gitignored `.whl/` folder, so a device run can install them offline.
#
# The GPU image (see the device KINDS.md package list) is Python 3.12, x86_64, with torch, triton,
# transformers, peft, accelerate, safetensors, tokenizers, numpy, pyyaml, tqdm, psutil, msgpack,
# ninja, einops, py-cpuinfo, nvidia-ml-py, packaging, sentence-transformers, timm, matplotlib; it
# lacks deepspeed (+ hjson, pydantic & co.), webdataset (+ braceexpand) and liger-kernel.
# Versions default to the ones installed in the project venv, so the device runs what the tests ran.
#
#   bash benchmarks/gpu_wheels.sh      # ~6 MiB; re-running skips nothing but is quick
#
# wandb is left out on purpose: 0.31 pulls opentelemetry and more (tens of MiB) and device runs log
# to stdout/JSON. Run the trainer there with wandb off.
#
# Then, on the device (carry: [".whl"]), start the command with the line this script prints last.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHL="${WHL_DIR:-$REPO/.whl}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
MAX_MIB="${MAX_MIB:-50}"
mkdir -p "$WHL"

# Version installed in the venv, else the given fallback pin.
venv_version() {
  "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"
}

# name fallback-version ; pure-Python or cp312 manylinux wheels for the device's Python 3.12.
PACKAGES=(
  "hjson 3.1.0"
  "pydantic 2.14.4"
  "pydantic-core 2.50.5"
  "annotated-types 0.8.0"
  "typing-inspection 0.4.5"
  "typing-extensions 4.16.0"
  "webdataset 1.0.2"
  "braceexpand 0.1.7"
  "liger-kernel 0.8.5"
)

download() {  # name==version as a Python 3.12 manylinux x86_64 binary wheel
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64 \
    -d "$WHL" "$1"
}

for entry in "${PACKAGES[@]}"; do
  read -r name fallback <<<"$entry"
  spec="$name==$(venv_version "$name" "$fallback")"
  echo "[gpu_wheels] $spec"
  download "$spec"
done

# DeepSpeed ships only an sdist; built without its C++ ops (JIT-built on the device if needed) it is
# a pure-Python wheel. --no-build-isolation: its setup.py imports torch, taken from the venv.
DS_VERSION="$(venv_version deepspeed 0.19.8)"
if ! ls "$WHL"/deepspeed-"$DS_VERSION"-*.whl >/dev/null 2>&1; then
  echo "[gpu_wheels] building deepspeed==$DS_VERSION (pure-Python wheel)"
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" "deepspeed==$DS_VERSION"
fi

# Two versions of one package stop the whole offline install: fail loudly here instead.
dupes="$(ls "$WHL"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z' 'a-z' | sort | uniq -d)"
if [[ -n "$dupes" ]]; then
  echo "[gpu_wheels] ERROR: several versions in $WHL of: $dupes (delete the stale ones)" >&2
  exit 1
fi

ls -la "$WHL"
total_kib="$(du -sk "$WHL" | cut -f1)"
echo "[gpu_wheels] $(ls "$WHL"/*.whl | wc -l) wheels, $((total_kib / 1024)) MiB in $WHL"
if (( total_kib > MAX_MIB * 1024 )); then
  echo "[gpu_wheels] ERROR: more than $MAX_MIB MiB: the device tool carries 64 MiB per call in all" >&2
  exit 1
fi

echo "[gpu_wheels] on the device (carry .whl), begin the command with:"
echo 'python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH PATH=/tmp/site/bin:$PATH'
