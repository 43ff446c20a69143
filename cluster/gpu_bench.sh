#!/usr/bin/env bash
# The GPU part of `backfill bench` on a GPU machine, with one command:
#
#   cluster/gpu_bench.sh [OUT_DIR] [more `backfill bench --gpu` options]
#
# It needs a python with a CUDA build of torch (PYTHON, default python3). The package's
# other needs (faiss-cpu, zarr, pydantic, ...; not Ray: the inline engine stands in for it
# here) come from wheels in WHEELS (default: .whl in the repository, for a machine without
# internet: fill it with `pip download` elsewhere) or else from PyPI, into a private folder
# (BACKFILL_SITE, default /tmp/backfill-site), so the machine's own packages are untouched.
# Run from any folder (paths are the caller's). Writes OUT_DIR/gpu_bench.json, OUT_DIR/gpu_bench.txt (the table) and OUT_DIR/nvidia-smi.txt.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-gpu_bench_out}
shift || true
python=${PYTHON:-python3}
wheels=${WHEELS:-$repo/.whl}
site=${BACKFILL_SITE:-/tmp/backfill-site}
needs=(faiss-cpu "zarr>=3" "pydantic>=2" tomli-w arch typer rich xarray pandas scipy pyyaml)

mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute: options like --config stay relative to the caller
if ! "$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_bench.sh: $python's torch sees no CUDA device; run this on a GPU machine" \
         "with a CUDA build of torch (or set PYTHON)" >&2
    exit 2
fi
if [ -d "$wheels" ] && compgen -G "$wheels/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$wheels"/*.whl
else
    # keep this interpreter's numpy (its torch was built against it)
    pins=$(mktemp)
    "$python" -c 'import numpy; print("numpy==" + numpy.__version__)' >"$pins"
    "$python" -m pip install -q --no-compile --upgrade --target "$site" -c "$pins" "${needs[@]}"
    rm -f "$pins"
fi
export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
# the repository's engine, never a folder named engine where this runs (-m and -c put the
# working folder first on sys.path; it is taken off, so PYTHONPATH decides)
"$python" -c 'import sys; del sys.path[0]; sys.argv[0] = "backfill"; from engine.cli import main; main()' \
    bench --gpu --json "$out/gpu_bench.json" "$@" | tee "$out/gpu_bench.txt"
