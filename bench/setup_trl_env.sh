#!/usr/bin/env bash
# Create the venv /work/main/.venv-trl in which TRL (the peer library of bench/lm.py) and mentor both import.
#
# Why a separate venv: TRL pulls `datasets`, `accelerate` and a transformers version of its own choosing; the main
# venv (.venv) stays as `make install` leaves it. torch is installed first, pinned to the local CPU build
# (torch==2.13.0, served from local disk), so that TRL's `torch` requirement is already met and no multi-GB CUDA
# build is downloaded; every later install repeats the pin so no resolver can move torch.
#
# Usage: bash bench/setup_trl_env.sh            (idempotent; re-running only re-checks)
#        VENV=/some/where TRL_VERSION=... bash bench/setup_trl_env.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-trl}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TRL_VERSION="${TRL_VERSION:-}"   # empty: the newest TRL that resolves beside the pinned torch
PY="$VENV/bin/python"

# shellcheck source=bench/_venv_common.sh
source "$ROOT/bench/_venv_common.sh"   # step, pip_install; creates $VENV if missing

# 1. The CPU torch build from local disk, alone, first.
step "torch==$TORCH_VERSION" pip_install "torch==$TORCH_VERSION"

# 2. TRL (+ datasets, which its trainers import), with torch pinned.
TRL_SPEC="trl"
[ -n "$TRL_VERSION" ] && TRL_SPEC="trl==$TRL_VERSION"
step "$TRL_SPEC datasets" pip_install "$TRL_SPEC" datasets "torch==$TORCH_VERSION"

# 3. mentor itself (editable, with the lm extra), again with torch pinned.
step "mentor[lm] (editable)" pip_install -e "$ROOT[lm]" "torch==$TORCH_VERSION"

# 4. Checks: torch unchanged, GKDTrainer imports (its home moved between TRL releases), mentor.lm imports.
step "import check" "$PY" - "$TORCH_VERSION" <<'EOF'
import sys

import torch

want = sys.argv[1]
assert torch.__version__.split("+")[0] == want, torch.__version__

import transformers
import trl

try:
    from trl import GKDConfig, GKDTrainer
    where = "trl"
except ImportError:
    from trl.experimental.gkd import GKDConfig, GKDTrainer  # TRL >= 0.2x moved GKD to experimental
    where = "trl.experimental.gkd"

import mentor.lm.models  # noqa: F401

print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__} "
      f"(GKDTrainer from {where}), cuda available: {torch.cuda.is_available()}")
EOF

du -sh "$VENV"
