#!/usr/bin/env bash
# The GPU checks and benchmark sets, one command, sized for a short GPU slot on an H100/H200: first the cuDNN
# attention backend against a float64 reference (bench/attention_parity.py; CI has no GPU), then
#   the `gpu` set (< 5 min): SD1.5 UNet forward (batch 2 = CFG), the 50-step DDIM + CFG + IP-Adapter loop at
#   512 px at batch 1 and 8 (JAX bf16 vs diffusers fp16 SDPA) and the 512-px training step at batch 8 (JAX bf16
#   vs PyTorch autocast bf16), then the `gpu-sdxl` set (SDXL 1024 px: UNet forward, 30-step CFG + Plus adapter loop
#   at batch 1 and 4, training step at batch 8) within SDXL_S seconds (default 420), FLUX.1 (bench/flux.py:
#   28-step 1024-px loop at batch 1 and 4, a training step) within FLUX_S seconds (default 240), then the
#   `gpu-extra` set within EXTRA_S seconds (default 120; 0 skips it).
# Needs jax[cuda], flax, torch (CUDA), transformers and diffusers; a folder .whl/ of wheels is installed
# first when present (the lent GPU machines have no network). Results: bench/results/ (and $OUT when set).
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
save() { if [ -n "${OUT:-}" ]; then cp bench/results/suite-gpu*.json "$OUT"/ 2>/dev/null || true;
         tar czf "$OUT/jsonl.tgz" bench/results/*.jsonl; fi; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, torch, diffusers, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, jax.devices())"
python3 bench/attention_parity.py || echo "attention_parity: FAILED, the cuDNN backend is over its bound"
python3 bench/suite.py --set gpu --no-docs || true
save
if [ "${SDXL_S:-420}" != 0 ]; then
  timeout "${SDXL_S:-420}" python3 bench/suite.py --set gpu-sdxl --no-docs || true
  save
fi
if [ "${FLUX_S:-240}" != 0 ]; then
  # FLUX.1-dev at 1024 px on random full-size weights (bf16): the 28-step loop with an XLabs v2 adapter at
  # batch 1 and 4, and one adapter training step (BENCHMARKS.md, "FLUX.1").
  timeout "${FLUX_S:-240}" bash -c 'python3 bench/flux.py sample --dtype bfloat16 --batch 1 --runs 2 &&
    python3 bench/flux.py sample --dtype bfloat16 --batch 4 --runs 2 &&
    python3 bench/flux.py train --dtype bfloat16 --batch 1 --runs 3' || true
  if [ -n "${OUT:-}" ]; then cp bench/results/flux_*.jsonl "$OUT"/ 2>/dev/null || true; fi
fi
if [ "${EXTRA_S:-120}" != 0 ]; then
  timeout "${EXTRA_S:-120}" python3 bench/suite.py --set gpu-extra --no-docs || true
  save
fi
