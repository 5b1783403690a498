#!/usr/bin/env bash
# The GPU benchmark set, one command, sized for a short GPU slot (< 10 min on an H100/H200):
#   SD1.5 UNet forward (batch 2 = CFG) and the full 50-step DDIM + CFG + IP-Adapter loop at 512 px,
#   batch 1 and 8: JAX bf16 vs diffusers fp16 (SDPA), same weights, same card, same process.
# Needs jax[cuda], flax, torch (CUDA), transformers and diffusers; a folder .whl/ of wheels is installed
# first when present (the lent GPU machines have no network). Results: bench/results/*.jsonl (and $OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.6
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, torch, diffusers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, jax.devices())"
[ -n "${SKIP_UNET:-}" ] || python3 bench/unet_forward.py --config sd15 --batch 2 --dtype bfloat16 --torch-dtype float16 --device cuda --runs 10
python3 bench/sampling.py --config sd15 --steps 50 --batch 1 --batch 8 --dtype bfloat16 --device cuda --runs 2
if [ -n "${OUT:-}" ]; then cp bench/results/*.jsonl "$OUT"/; fi
