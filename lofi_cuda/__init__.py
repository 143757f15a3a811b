"""lofi's ONNX Runtime engine: ACE-Step v1 on NVIDIA GPUs (CUDA) or any CPU.

Importing this package loads no ML framework; `lofi_cuda.engine.ONNXEngine` imports
onnxruntime when created. The graphs are made by `python -m convert.to_onnx` (the `export`
extra: torch, onnx) or exported on first use.
"""
