#!/usr/bin/env bash
# Create the benchmark venv /work/main/.venv-bench in which torchdistill (the peer library) and mentor both import.
#
# Why a separate venv: torchdistill imports torchvision, and no PyPI torchvision loads beside the main venv's local
# CPU wheel torch==2.13.0+cpu ("operator torchvision::nms does not exist"). Here we install the matching pair
# torch==2.14.1 / torchvision==0.29.1, which this machine serves from local disk (a CUDA build, ~5.5 GB, runs on
# CPU), then torchdistill from PyPI, then mentor editable. The main venv (.venv) is not touched.
#
# Usage: bash bench/setup_peer_env.sh            (idempotent; re-running only re-checks)
#        VENV=/some/where bash bench/setup_peer_env.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-bench}"
TORCH_VERSION="${TORCH_VERSION:-2.14.1}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.29.1}"
TORCHDISTILL_VERSION="${TORCHDISTILL_VERSION:-1.1.5}"
PY="$VENV/bin/python"

# shellcheck source=bench/_venv_common.sh
source "$ROOT/bench/_venv_common.sh"   # step, pip_install; creates $VENV if missing

# 1. The torch/torchvision pair (both from local disk here; the constraints file caps torch<=2.14.1).
step "torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION" \
  pip_install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

# 2. torchdistill, pinned so its resolver cannot move torch.
step "torchdistill==$TORCHDISTILL_VERSION" \
  pip_install "torchdistill==$TORCHDISTILL_VERSION" \
  "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

# 3. mentor itself (editable), again with torch pinned so its dependencies cannot replace it.
step "mentor (editable)" \
  pip_install -e "$ROOT" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

# 4. Checks: versions unchanged, both libraries import, torchdistill's KD loss runs on CPU.
step "import check" "$PY" - "$TORCH_VERSION" "$TORCHVISION_VERSION" <<'EOF'
import sys

import torch
import torchvision

want_torch, want_tv = sys.argv[1], sys.argv[2]
assert torch.__version__.split("+")[0] == want_torch, torch.__version__
assert torchvision.__version__.split("+")[0] == want_tv, torchvision.__version__
torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)  # the op that fails with a mismatched pair

import torchdistill
from torchdistill.losses.registry import get_mid_level_loss

import mentor

kd = get_mid_level_loss({"key": "KDLoss", "kwargs": {"student_module_path": ".", "student_module_io": "output",
                                                     "teacher_module_path": ".", "teacher_module_io": "output",
                                                     "temperature": 4.0, "alpha": 0.5, "reduction": "batchmean"}})
s, t, y = torch.randn(8, 10), torch.randn(8, 10), torch.randint(0, 10, (8,))
io = {".": {"output": s}}
loss = kd(io, {".": {"output": t}}, y)
assert torch.isfinite(loss), loss
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, torchdistill {torchdistill.__version__}, "
      f"mentor {getattr(mentor, '__version__', '?')}, cuda available: {torch.cuda.is_available()}, "
      f"{type(kd).__name__} loss = {loss.item():.4f}")
EOF

du -sh "$VENV"
