"""Quantized DiT weights (`--quantize 8|4`, LOFI_QUANTIZE): the transformer blocks' linear layers
stored as affine-quantized integers (MLX's `mx.quantize`: `bits` per weight, one fp scale and
bias per `group_size` consecutive inputs).

Only the 24 blocks' linears (q/k/v/out of both attentions, the feed-forward's two projections:
94 % of the DiT's parameters) are quantized; embedders, t_block, the lyric encoder and the final
layer stay in the run dtype. On a GPU the layer runs MLX's quantized matmul. On a CPU MLX's
quantized matmul is ~70x slower than the fp32 GEMM (measured: 1.2 s against 0.017 s for one
2560x2560 layer on 216 rows), so there the layer unpacks its weight into the run dtype and
uses the BLAS GEMM: the weight is held quantized and widened one layer at a time.
"""

from __future__ import annotations

from mlx.utils import tree_map_with_path

from lofi.errors import INVALID_PARAMS, LofiError
from lofi_mlx.mlxrt import mx
from lofi_mlx.mlxrt import nn

BITS = (8, 4)
# group size: measured on the mid-size model (benchmarks/quant_error.py, benchmarks/RESULTS.md)
GROUP_SIZE = 64


def check_bits(bits) -> int | None:
    if bits in (None, 0, "", "none", "off"):
        return None
    try:
        b = int(bits)
    except (TypeError, ValueError):
        b = None
    if b not in BITS:
        raise LofiError(INVALID_PARAMS, f"quantize must be one of {', '.join(map(str, BITS))} "
                        f"(bits per DiT weight) or none, got {bits!r}")
    return b


def _unpack(w, scales, biases, bits: int, group_size: int):
    """The affine dequantization as plain ops, [out, in] in the scales' dtype (3x faster than
    mx.dequantize on the CPU, same values)."""
    u = mx.view(w, mx.uint8)
    if bits == 4:
        u = mx.stack([u & 15, u >> 4], axis=-1)
    elif bits != 8:
        return mx.dequantize(w, scales, biases, group_size=group_size, bits=bits)
    out = u.shape[0]
    q = u.reshape(out, -1, group_size).astype(scales.dtype)
    return (q * scales[..., None] + biases[..., None]).reshape(out, -1)


class QuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear whose CPU path is unpack + GEMM."""

    @classmethod
    def empty(cls, input_dims: int, output_dims: int, bias: bool, group_size: int, bits: int,
              dtype=mx.float32) -> "QuantizedLinear":
        """The layer's shapes without quantizing a random matrix (weights are loaded next)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.group_size, layer.bits, layer.mode = group_size, bits, "affine"
        layer.weight = mx.zeros((output_dims, input_dims * bits // 32), mx.uint32)
        layer.scales = mx.zeros((output_dims, input_dims // group_size), dtype)
        layer.biases = mx.zeros((output_dims, input_dims // group_size), dtype)
        if bias:
            layer.bias = mx.zeros((output_dims,), dtype)
        layer.freeze()
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = GROUP_SIZE, bits: int = 8):
        out_dims, in_dims = linear.weight.shape
        layer = cls.empty(in_dims, out_dims, "bias" in linear, group_size, bits, linear.weight.dtype)
        layer.weight, layer.scales, layer.biases = mx.quantize(linear.weight, group_size, bits)
        if "bias" in linear:
            layer.bias = linear.bias
        return layer

    def __call__(self, x):
        if mx.default_device().type != mx.DeviceType.cpu:
            return super().__call__(x)
        w = _unpack(self["weight"], self["scales"], self["biases"], self.bits, self.group_size)
        y = x @ w.astype(x.dtype).T
        return y + self["bias"] if "bias" in self else y


def _eligible(path: str, module, group_size: int) -> bool:
    return (path.startswith("transformer_blocks.") and isinstance(module, nn.Linear)
            and module.weight.shape[1] % group_size == 0)


def eligible_weights(model, group_size: int = GROUP_SIZE) -> set[str]:
    """Names of the weights `quantize_dit` quantizes."""
    return {f"{p}.weight" for p, m in model.named_modules() if _eligible(p, m, group_size)}


def quantize_dit(model, bits: int, group_size: int = GROUP_SIZE):
    """Quantize the DiT's block linears in place (each evaluated as it goes: peak memory is the
    full-precision model plus one layer); returns the model."""
    def swap(path, m):
        if not _eligible(path, m, group_size):
            return m
        q = QuantizedLinear.from_linear(m, group_size, bits)
        mx.eval(q.parameters())
        return q

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return model


def quantized_skeleton(model, weights: dict):
    """Replace the linears whose saved weights are quantized (`<path>.scales` present) by empty
    quantized layers of the saved bits and group size, so a strict load fits. Bits and group size
    come from the shapes: packed width = in * bits / 32, scales width = in / group_size."""
    def swap(path, m):
        if not isinstance(m, nn.Linear) or f"{path}.scales" not in weights:
            return m
        out_dims, in_dims = m.weight.shape
        bits = weights[f"{path}.weight"].shape[1] * 32 // in_dims
        group_size = in_dims // weights[f"{path}.scales"].shape[1]
        return QuantizedLinear.empty(in_dims, out_dims, "bias" in m, group_size, bits,
                                     weights[f"{path}.scales"].dtype)

    model.update_modules(tree_map_with_path(swap, model.leaf_modules(), is_leaf=nn.Module.is_module))
    return model


def quantization_of(model) -> dict | None:
    """{"bits", "group_size"} of a model's quantized layers, or None."""
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            return {"bits": int(m.bits), "group_size": int(m.group_size)}
    return None
