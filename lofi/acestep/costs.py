"""The progress clock's cost model for a job with nothing measured yet (lofi.progress): each
decoder's time in unguided DiT steps, scaled from the released model's figures by the work per
audio second of this checkpoint's networks, as their configs give it.

Work is counted in multiply-adds per output position relative to the released configs (the
dataclass defaults), which is what sets the time of a large network. A small network is bound
by per-call overheads instead, so every network's work is floored at OVERHEAD of the released
one's: the tiny test model then keeps the released model's ratios, and a model with released
decoders but a shallow DiT (the synthetic `mid` size) gets decoders many steps long."""

from __future__ import annotations

from pathlib import Path

from lofi.acestep.configs import DCAEConfig, DiTConfig, VocoderConfig
from lofi.checkpoint import read_config

OVERHEAD = 0.03


def dit_work(c: DiTConfig) -> float:
    """Per latent frame of one row: attention projections + GLU feed-forward per layer."""
    return c.num_layers * (4 * c.width ** 2 + 3 * c.width * c.ffn_hidden)


def dcae_work(c: DCAEConfig) -> float:
    """Per output mel position: each decoder stage at its resolution (a quarter per level)."""
    stages = zip(c.decoder_block_out_channels, c.decoder_layers_per_block)
    return sum(ch * ch * n / 4 ** i for i, (ch, n) in enumerate(stages))


def vocoder_work(c: VocoderConfig) -> float:
    """Per mel frame: the ConvNeXt backbone, then the HiFi-GAN head whose stages halve the
    channels as the rate grows (two convs per dilation in each resblock)."""
    work = sum(8 * dim * dim * n for dim, n in zip(c.dims, c.depths))
    taps = sum(2 * k * len(d) for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes))
    rate = 1
    for j, up in enumerate(c.upsample_rates):
        rate *= up
        ch = c.upsample_initial_channel // 2 ** (j + 1)
        work += rate * ch * ch * taps
    return work


def _relative(work: float, full: float) -> float:
    return max(work / full, OVERHEAD)


def decode_costs(checkpoint: str | Path, base: dict[str, float]) -> dict[str, float]:
    """{"dcae": steps, "vocoder": steps} for this checkpoint, from `base` (the released model's
    figures); `base` itself where a config cannot be read."""
    try:
        dit = DiTConfig.from_dict(read_config(checkpoint, "transformer"))
        dcae = DCAEConfig.from_dict(read_config(checkpoint, "dcae"))
        voc = VocoderConfig.from_dict(read_config(checkpoint, "vocoder"))
    except Exception:  # a damaged config fails the job elsewhere, with its own message
        return dict(base)
    step = _relative(dit_work(dit), dit_work(DiTConfig()))
    return {"dcae": base["dcae"] * _relative(dcae_work(dcae), dcae_work(DCAEConfig())) / step,
            "vocoder": base["vocoder"] * _relative(vocoder_work(voc), vocoder_work(VocoderConfig())) / step}
