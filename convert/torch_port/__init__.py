"""PyTorch implementation of ACE-Step v1's networks, used only to export ONNX graphs.

One module per network (umt5, dit with its lyric encoder, dcae, vocoder), each loading the
Hugging Face checkpoint layout through `lofi.checkpoint.load_component`. Nothing here is on
the inference path: the ONNX engine runs the exported graphs.
"""
