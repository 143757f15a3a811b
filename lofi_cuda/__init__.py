"""lofi's ONNX Runtime engine: ACE-Step v1 on NVIDIA GPUs (CUDA) or any CPU.

Importing this package loads no ML framework; `lofi_cuda.engine.ONNXEngine` imports
onnxruntime when created. The graphs are built from the checkpoint by `lofi_cuda.build` (the
`onnx` package, no PyTorch) during `lofi setup` or on first use.
"""
