"""The ACE-Step v1 diffusion transformer (spec §4) as two graphs, as the sampler uses them:
* `dit_encode`: text hidden states + lyrics -> cross-attention context (once per condition);
* `dit_decode`: one velocity evaluation for a stacked batch of rows.

Mirrors convert/torch_port/dit.py: inputs and outputs fp32, the run dtype inside; position
tables are inputs; ERG is a per-row `q_scale` [B] on the q projections of blocks 15-19. Half
precision keeps RoPE arithmetic, linear-attention sums, softmax and RMS statistics in fp32.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from lofi.acestep.configs import (DIT_CLIP, DIT_ERG_BLOCKS, DIT_GROUPS, DIT_UNUSED_PARTS,
                                  DIT_UNUSED_PREFIXES, DiTConfig, LyricEncoderConfig)
from lofi.acestep.tables import TIME_CHANNELS, time_frequencies

from lofi_cuda.build.graph import BOOL, F32, I64, Graph, Value
from lofi_cuda.build.lyric_encoder import LyricEncoder
from lofi_cuda.build.weights import Weights


class Builder:
    def __init__(self, g: Graph, w: Weights, cfg: DiTConfig):
        self.g, self.w, self.cfg = g, w, cfg

    def p(self, key: str, shape, arr=None) -> Value:
        return self.g.param(self.w.get(key, shape) if arr is None else arr, name=key)

    def linear(self, x: Value, key: str, cin: int, cout: int, bias: bool = True) -> Value:
        w = self.p(key + ".weight", None, self.w.get(key + ".weight", (cout, cin)).T)
        self.g.weight_map[key + ".weight"] = {"init": w.name, "transposed": True}
        return self.g.linear(x, w, self.p(key + ".bias", (cout,)) if bias else None)

    def rms_norm(self, x: Value) -> Value:
        g = self.g
        xf = x.float()
        return g.cast(xf * g.rsqrt(g.mean(xf * xf, [-1]) + self.cfg.norm_eps), x.dtype)

    def rope(self, x: Value, cos: Value, sin: Value) -> Value:
        """x [B, N, H, d]; cos/sin [N, d] fp32: pairs (2i, 2i+1) rotate, in fp32."""
        g, d = self.g, self.cfg.head_dim
        xf = x.float()
        p0, p1 = g.split(g.reshape(xf, [0, 0, 0, d // 2, 2]), 2, -1)
        rot = g.reshape(g.concat([-p1, p0], -1), [0, 0, 0, d])
        return g.cast(xf * g.unsqueeze(cos, [1]) + rot * g.unsqueeze(sin, [1]), x.dtype)

    def scale_rows(self, q: Value, q_scale: Value | None) -> Value:
        return q if q_scale is None else self.g.cast(q.float() * q_scale, q.dtype)

    # -- decode ----------------------------------------------------------------------------------
    def self_attention(self, x, key, cos, sin, q_scale):
        g, c = self.g, self.cfg
        D, H, d = c.width, c.num_heads, c.head_dim
        q = self.rope(g.reshape(self.scale_rows(self.linear(x, key + ".to_q", D, D), q_scale), [0, 0, H, d]), cos, sin)
        k = self.rope(g.reshape(self.linear(x, key + ".to_k", D, D), [0, 0, H, d]), cos, sin)
        v = g.reshape(self.linear(x, key + ".to_v", D, D), [0, 0, H, d])
        q = g.relu(q).float().permute(0, 2, 1, 3)
        k = g.relu(k).float().permute(0, 2, 1, 3)
        v = v.float().permute(0, 2, 1, 3)
        # a ones column on V makes the same product carry the normaliser sum_s K_s.Q_t
        v = g.op("Pad", v, g.ints([0, 0, 0, 0, 0, 0, 0, 1]), g.const(1.0))
        o = q @ (k.permute(0, 1, 3, 2) @ v)                                 # [B, H, T, d+1]
        o = g.slice(o, 0, d, 3) / (g.slice(o, d, d + 1, 3) + 1e-15)
        o = g.cast(g.reshape(o.permute(0, 2, 1, 3), [0, 0, D]), x.dtype)
        return g.op("Clip", self.linear(o, key + ".to_out.0", D, D), g.const(-DIT_CLIP, o.dtype),
                    g.const(DIT_CLIP, o.dtype))

    def cross_attention(self, x, ctx, key_bias, has_key, rope, rope_ctx, key, q_scale):
        g, c = self.g, self.cfg
        D, H, d = c.width, c.num_heads, c.head_dim
        q = self.rope(g.reshape(self.scale_rows(self.linear(x, key + ".to_q", D, D), q_scale), [0, 0, H, d]),
                      *rope).permute(0, 2, 1, 3)
        k = self.rope(g.reshape(self.linear(ctx, key + ".to_k", D, D), [0, 0, H, d]), *rope_ctx).permute(0, 2, 1, 3)
        v = g.reshape(self.linear(ctx, key + ".to_v", D, D), [0, 0, H, d]).permute(0, 2, 1, 3)
        s = (q.float() @ k.float().permute(0, 1, 3, 2)) * (1.0 / math.sqrt(d)) + key_bias
        o = g.cast(g.softmax(s), v.dtype) @ v
        # a row whose keys are all masked is NaN in the reference; give it 0 instead
        o = g.where(has_key, o, 0.0)
        return self.linear(g.reshape(o.permute(0, 2, 1, 3), [0, 0, D]), key + ".to_out.0", D, D)

    def ff(self, x, key):
        g, c = self.g, self.cfg
        D, Fh = c.width, c.ffn_hidden
        wi = self.w.get(key + ".inverted_conv.conv.weight", (2 * Fh, D, 1))
        u = g.linear(x, self.p(key + ".inverted_conv.conv.weight", None, wi[:, :, 0].T),
                     self.p(key + ".inverted_conv.conv.bias", (2 * Fh,)))
        u = g.silu(u)
        # depthwise conv, kernel 3, zero padding 1, along time: three shifted multiply-adds
        wd = self.w.get(key + ".depth_conv.conv.weight", (2 * Fh, 1, 3))
        taps = self.p(key + ".depth_conv.conv.weight", None, np.ascontiguousarray(wd[:, 0, :].T))
        pu = g.op("Pad", u, g.ints([0, 1, 0, 0, 1, 0]))
        t = [g.op("Gather", taps, g.ints(i), axis=0) for i in range(3)]
        u = (g.slice(pu, 0, -2, 1) * t[0] + g.slice(pu, 1, -1, 1) * t[1] + g.slice(pu, 2, 1 << 62, 1) * t[2]
             + self.p(key + ".depth_conv.conv.bias", (2 * Fh,)))
        a, gate = g.split(u, 2, -1)
        wp = self.w.get(key + ".point_conv.conv.weight", (D, Fh, 1))
        return g.linear(a * g.silu(gate), self.p(key + ".point_conv.conv.weight", None, wp[:, :, 0].T))

    def block(self, i, h, temb6, rope, ctx, key_bias, has_key, rope_ctx, q_scale):
        g, c = self.g, self.cfg
        key = f"transformer_blocks.{i}"
        mod = g.unsqueeze(self.p(key + ".scale_shift_table", (6, c.width)), [0]) + temb6
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = g.split(mod, 6, 1)
        n = self.rms_norm(h) * (1.0 + scale_msa) + shift_msa
        h = h + gate_msa * self.self_attention(n, key + ".attn", rope[0], rope[1], q_scale)
        # cross-attention reads the raw residual stream: no norm, no modulation, no gate
        h = h + self.cross_attention(h, ctx, key_bias, has_key, rope, rope_ctx, key + ".cross_attn", q_scale)
        n = self.rms_norm(h) * (1.0 + scale_mlp) + shift_mlp
        return h + gate_mlp * self.ff(n, key + ".ff")

    def decode(self, x, timestep, ctx, ctx_mask, q_scale, cos, sin, cos_ctx, sin_ctx) -> Value:
        g, c = self.g, self.cfg
        dt, D = g.dtype, c.width
        x = g.cast(x, dt)
        a = g.unsqueeze(timestep.float(), [1]) * g.unsqueeze(g.const(time_frequencies()), [0])
        e = g.concat([g.op("Cos", a), g.op("Sin", a)], -1)                   # cos first
        emb = self.linear(g.silu(self.linear(g.cast(e, dt), "timestep_embedder.linear_1", TIME_CHANNELS, D)),
                          "timestep_embedder.linear_2", D, D)
        temb = self.linear(g.silu(emb), "t_block.1", D, 6 * D)
        h = self.patch_embed(x)
        # only an exact 1 lets a key through, as the reference's where(mask == 1, 0, -inf)
        keep = g.op("Equal", ctx_mask, g.const(1.0), dtype=BOOL)
        key_bias = g.unsqueeze(g.where(keep, g.const(0.0), float("-inf")), [1, 2])
        has_key = g.op("Cast", g.op("ReduceMax", g.cast(keep, F32), g.ints([1]), keepdims=1), dtype=BOOL, to=BOOL)
        has_key = g.unsqueeze(has_key, [2, 3])
        ctx = g.cast(ctx, dt)
        qs = g.unsqueeze(q_scale.float(), [1, 2])
        temb6 = g.reshape(temb, [0, 6, D])
        for i in range(c.num_layers):
            h = self.block(i, h, temb6, (cos, sin), ctx, key_bias, has_key, (cos_ctx, sin_ctx),
                           qs if i in DIT_ERG_BLOCKS else None)
        table = g.unsqueeze(self.p("final_layer.scale_shift_table", (2, D)), [0])
        shift, scale = g.split(table + g.unsqueeze(emb, [1]), 2, 1)
        y = self.linear(self.rms_norm(h) * (1.0 + scale) + shift, "final_layer.linear", D,
                        c.patch_height * c.out_channels)
        return g.reshape(y, [0, 0, c.patch_height, c.out_channels]).permute(0, 3, 2, 1).float()

    def patch_embed(self, x: Value) -> Value:
        """Conv(16x1, stride 16x1) -> GroupNorm(32) -> Conv 1x1, as matmuls around a GroupNorm
        whose statistics span all frames."""
        g, c = self.g, self.cfg
        hid, cin = c.patch_hidden, c.in_channels * c.patch_height
        key = "proj_in.early_conv_layers"
        w0 = self.w.get(key + ".0.weight", (hid, c.in_channels, c.patch_height, 1)).reshape(hid, cin)
        y = g.linear(g.reshape(x.permute(0, 3, 1, 2), [0, 0, cin]), self.p(key + ".0.weight", None, w0.T),
                     self.p(key + ".0.bias", (hid,)))
        yf = g.reshape(y.float(), [0, 0, DIT_GROUPS, -1])
        d = yf - g.mean(yf, [1, 3])
        y = g.cast(g.reshape(d * g.rsqrt(g.mean(d * d, [1, 3]) + c.norm_eps), [0, 0, -1]), y.dtype)
        y = y * self.p(key + ".1.weight", (hid,)) + self.p(key + ".1.bias", (hid,))
        w2 = self.w.get(key + ".2.weight", (c.width, hid, 1, 1)).reshape(c.width, hid)
        return g.linear(y, self.p(key + ".2.weight", None, w2.T), self.p(key + ".2.bias", (c.width,)))

    # -- encode ----------------------------------------------------------------------------------
    def encode(self, text, text_mask, lyric_ids, lyric_mask, pe, rel_index, lyric_q_scale, lc):
        g, c = self.g, self.cfg
        D = c.width
        # the speaker embedding is zero in v1: its projection is exactly the bias
        self.w.ignored.add("speaker_embedder.weight")
        bias = g.reshape(self.p("speaker_embedder.bias", (D,)), [1, 1, D])
        spk = g.op("Expand", bias, g.concat([g.shape(text, 0, 1), [1, D]], 0))
        txt = self.linear(g.cast(text, g.dtype), "genre_embedder", c.text_dim, D)
        lyr = g.op("Gather", self.p("lyric_embs.weight", (c.lyric_vocab, c.lyric_hidden)), lyric_ids, axis=0)
        lyr = LyricEncoder(g, self.w, lc)(lyr, lyric_mask, pe, rel_index, lyric_q_scale)
        lyr = self.linear(lyr, "lyric_proj", lc.width, D)
        ctx = g.concat([spk, txt, lyr], 1).float()
        one = g.op("Expand", g.ints([[1]]), g.concat([g.shape(text_mask, 0, 1), [1]], 0))
        return ctx, g.concat([one, text_mask, lyric_mask], 1).float()


def lyric_config(w: Weights) -> LyricEncoderConfig:
    """Sizes from the weight shapes (the reference hard-codes them), without reading any tensor."""
    return LyricEncoderConfig.from_weights({k: SimpleNamespace(shape=w.shape(k)) for k in w.keys()})


def build(root, folder, dtype):
    """Yield ("dit_encode", entry) then ("dit_decode", entry) as each graph is written."""
    w = Weights(root, "transformer", drop_prefixes=DIT_UNUSED_PREFIXES, drop_parts=DIT_UNUSED_PARTS)
    cfg = DiTConfig.from_dict(w.config)
    lc = lyric_config(w)
    g = Graph("dit_encode", folder, dtype)
    try:
        b = Builder(g, w, cfg)
        ins = [g.input("text_hidden", F32, ["B", "Nt", cfg.text_dim]), g.input("text_mask", I64, ["B", "Nt"]),
               g.input("lyric_ids", I64, ["B", "Nl"]), g.input("lyric_mask", I64, ["B", "Nl"]),
               g.input("pe", F32, ["P", lc.width]), g.input("rel_index", I64, ["Nl", "Nl"]),
               g.input("lyric_q_scale", F32, [lc.blocks])]
        ctx, mask = b.encode(*ins, lc)
        g.output(ctx, "ctx", ["B", "L", cfg.width])
        g.output(mask, "ctx_mask", ["B", "L"])
        entry = g.save("ACE-Step v1 DiT: condition encoder")
    except BaseException:
        g.abandon()
        raise
    yield "dit_encode", entry
    g = Graph("dit_decode", folder, dtype)
    try:
        b = Builder(g, w, cfg)
        ins = [g.input("x", F32, ["B", cfg.in_channels, cfg.patch_height, "T"]), g.input("timestep", F32, ["B"]),
               g.input("ctx", F32, ["B", "L", cfg.width]), g.input("ctx_mask", F32, ["B", "L"]),
               g.input("q_scale", F32, ["B"]), g.input("cos", F32, ["T", cfg.head_dim]),
               g.input("sin", F32, ["T", cfg.head_dim]), g.input("cos_ctx", F32, ["L", cfg.head_dim]),
               g.input("sin_ctx", F32, ["L", cfg.head_dim])]
        g.output(b.decode(*ins), "velocity", ["B", cfg.out_channels, cfg.patch_height, "T"])
        w.finish()
        entry = g.save("ACE-Step v1 DiT: one velocity evaluation")
    except BaseException:
        g.abandon()
        raise
    yield "dit_decode", entry
