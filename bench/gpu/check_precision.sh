#!/usr/bin/env bash
# Run bench/gpu/check_precision.py on a machine whose python3 lacks some of distill's dependencies:
# the wheels in bench/gpu/wheels (if any) of the packages it lacks go into /tmp/site, the repo is
# used from its folder (PYTHONPATH). Results in $OUT (default /tmp/check_precision).
#   OUT=/tmp/cp bench/gpu/check_precision.sh --device cuda
# For the nvidia-h200 device (Python 3.12, no network; its image lacks zarr, numcodecs, donfig,
# google-crc32c, datasets, dill, multiprocess), fetch the wheels here first, ~11 MB, and delete
# them after the run (never commit them):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d bench/gpu/wheels zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
#     datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# (datasets 5.2 needs huggingface-hub>=1.31 and pyarrow>=24 from the image.) Then, through the
# device tool: bash bench/gpu/check_precision.sh --device cuda --budget-s 470 --work /tmp/cpw
# with timeout_s 540 (the script skips bench/stage2.py when less than --stage2-min-s is left).
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export OUT=${OUT:-/tmp/check_precision}
mkdir -p "$OUT"
{ $PY -V; command -v nvidia-smi >/dev/null && nvidia-smi -L
  $PY -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|zarr|numcodecs|datasets|typer|tokenizers|h5py|fsspec|matplotlib|tqdm|pyyaml|numpy|donfig|crc32c|google-crc32c|pyarrow|huggingface.hub|dill|multiprocess|pandas|xxhash) "
} 2>&1 | tee "$OUT/env.txt"
WHEELS=bench/gpu/wheels
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  missing=$($PY - "$WHEELS"/*.whl <<'PYEOF'
import importlib.metadata as md, sys, os
for w in sys.argv[1:]:
    name = os.path.basename(w).split("-")[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(w)
PYEOF
)
  echo "installing from wheels: ${missing:-nothing}"
  if [ -n "$missing" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $missing || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
set -o pipefail
$PY bench/gpu/check_precision.py "$@" 2>&1 | tee -a "$OUT/run.log"
