#!/usr/bin/env bash
# The GPU check: on one CUDA GPU, in at most 8 minutes (sized for one H100/H200), from the repo root. It installs the
# carried wheels (bench/gpu_prepare.sh, run here first) beside the machine's torch and transformers, then runs
#   1. the `gpu`-marked tests (tests/stages/test_gpu.py: FSDP2 and ZeRO saves, FlashAttention 2 / Liger /
#      padding-free losses; each skips, saying why, without its package);
#   2. bench/gpu.py: the `gpu` profile's sft and pm on SmolLM2-135M's architecture, then `mfu:` (SFT at sequence
#      length 2048) and `gen_gpu:` (the transformers engine at batch 512 x 128 new tokens).
# Everything it prints also goes to $OUT/gpu_check.log when OUT is set (the device tool brings that folder back).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log="${OUT:-/tmp}/gpu_check.log"
exec > >(tee "$log") 2>&1
started=$SECONDS

nvidia-smi -L
if [ -d .whl ]; then
  # --no-build-isolation: the one sdist (antlr4's) builds with the image's setuptools, offline.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade \
    --target /tmp/site .whl/*
  export PYTHONPATH="/tmp/site:$PWD/src:$PWD"
else
  export PYTHONPATH="$PWD/src:$PWD"
fi
python3 -c "import torch, transformers, trl, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'trl', trl.__version__, 'accelerate', accelerate.__version__)"
for pkg in flash_attn liger_kernel deepspeed; do
  python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$pkg') is None)" \
    && echo "$pkg: installed" || echo "$pkg: not installed (its tests skip)"
done

echo "== gpu tests ($((SECONDS - started)) s)"
tests=0
timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu -rs -s tests/stages/test_gpu.py || tests=$?

echo "== bench/gpu.py ($((SECONDS - started)) s)"
timeout 240 python3 bench/gpu.py --shape-of .gpu/smollm2

echo "gpu_check: $((SECONDS - started)) s; gpu tests exit $tests"
exit "$tests"
