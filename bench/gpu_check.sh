#!/usr/bin/env bash
# One-GPU check of megatrain (loss parity CPU vs GPU, a ~1B bf16 model's tokens/s, MFU and memory against
# the plan, save/resume): bench/gpu_check.py says what each part checks. Under 8 minutes on one H200.
#
#   bench/gpu_check.sh [--dry-run] [--out DIR]     # --dry-run: toy sizes on the CPU, in CI
#
# A bare GPU machine with only PyTorch lacks DeepSpeed, Hydra and the rest: when they do not import, the
# wheels in $WHEELS (default: .whl/ in the repository root, carried beside the checkout) are installed
# into /tmp/site. `python3 -m bench.gpu_wheels` fetches them (26 packages) on a machine with pip access.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning WANDB_MODE=disabled
WHEELS=${WHEELS:-.whl}
if ! python3 -c "import deepspeed, hydra, omegaconf" 2>/dev/null; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "error: deepspeed / hydra-core / omegaconf do not import and $WHEELS holds no wheels;" \
             "run python3 -m bench.gpu_wheels where pip can reach PyPI and carry $WHEELS here" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import sys, torch, deepspeed; print('python', sys.version.split()[0], 'torch', torch.__version__,
      'deepspeed', deepspeed.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
exec python3 -m bench.gpu_check "$@"
