#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md: the full-size synthetic model (real configs, random
# weights), 120 s of audio, 27 steps, on a CUDA machine with PyTorch installed. MLX on CUDA needs
# the wheels mlx and mlx-cuda-13 (and soundfile, soxr, cffi, pycparser) in $LOFI_WHEELS.
#   bash benchmarks/gpu_session.sh OUT_DIR
set -u
out=${1:-${OUT:-./gpu-results}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"

# PyTorch eager baseline as the reference runs (bf16, SDPA), then fp16 (what the ONNX graphs compute)
for dt in ${TORCH_DTYPES-bf16 fp16}; do
  timeout 150 python3 benchmarks/compare_engines.py --cuda-full --dtype $dt \
    > "$out/torch_$dt.json" 2> "$out/torch_$dt.err"
  tail -3 "$out/torch_$dt.json"
done

# MLX on CUDA, through lofi's own benchmark (the real pipeline, daemon ETA tracker): the default
# memory policy (each network loaded for its stage, then dropped), then all networks resident
if [ -n "${LOFI_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lofi-site "$LOFI_WHEELS"/*.whl
  for mode in lazy resident; do
    extra=""; [ $mode = resident ] && extra="--keep-loaded"
    PYTHONPATH="/tmp/lofi-site:$PYTHONPATH" timeout 240 python3 -m lofi_mlx.bench --synthetic full \
      --precision fp16 --duration 120 --steps 27 --runs 3 --warmup 1 --device gpu $extra --json \
      > "$out/mlx_cuda_fp16_$mode.json" 2> "$out/mlx_cuda_fp16_$mode.err"
    tail -3 "$out/mlx_cuda_fp16_$mode.err"
    PYTHONPATH="/tmp/lofi-site:$PYTHONPATH" python3 - "$out/mlx_cuda_fp16_$mode.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no MLX result: {e}")
from lofi_mlx.bench import print_table
print_table(r)
PY
  done
fi
