"""PyTorch implementation of ACE-Step v1's networks: the oracle the ONNX graphs are tested against.

One module per network (umt5, dit with its lyric encoder, dcae, vocoder), each loading the
Hugging Face checkpoint layout through `lofi.checkpoint.load_component`. Nothing here is on
the inference or setup path: the ONNX engine runs graphs built by `lofi_cuda.build` (no torch),
which tests/test_onnx.py compares with these modules.
"""
