"""MusicGen on ONNX Runtime: graphs built from the checkpoint by lofi_cuda.build.musicgen."""
