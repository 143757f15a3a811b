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
for dt in bf16 fp16; do
  timeout 150 python3 benchmarks/compare_engines.py --cuda-full --dtype $dt \
    > "$out/torch_$dt.json" 2> "$out/torch_$dt.err"
  tail -3 "$out/torch_$dt.json"
done

# MLX on CUDA, through lofi's own benchmark (the real pipeline, daemon ETA tracker)
if [ -n "${LOFI_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/lofi-site "$LOFI_WHEELS"/*.whl
  PYTHONPATH="/tmp/lofi-site:$PYTHONPATH" timeout 330 python3 -m lofi_mlx.bench --synthetic full \
    --precision fp16 --duration 120 --steps 27 --runs 2 --warmup 1 --device gpu --json \
    > "$out/mlx_cuda_fp16.json" 2> "$out/mlx_cuda_fp16.err"
  tail -5 "$out/mlx_cuda_fp16.err"
  python3 - "$out/mlx_cuda_fp16.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    sys.exit(f"no MLX result: {e}")
print({k: round(v["median"], 3) for k, v in r["stages"].items()})
print("rtf", r["rtf"], "guided step", r["guided_step_sec"], "peak GiB", r["engine_peak_bytes"] / 2**30)
PY
fi
