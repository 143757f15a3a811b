"""Time tiles with an exact halo (lofi.acestep.tiling) and the MLX decoders run in them."""

import numpy as np
import pytest

from lofi.acestep import tiling
from lofi.acestep.configs import DCAEConfig, VocoderConfig
from lofi.checkpoint import read_config
from lofi_mlx.mlxrt import mx
from mlx.utils import tree_map
from lofi_mlx.acestep import dcae
from lofi_mlx.synthetic import DCAE as DCAE_REAL
from lofi_mlx.synthetic import VOCODER as VOCODER_REAL

from tests.conftest import CHECKPOINT, golden


@pytest.mark.parametrize("n,tile,halo", [(1, 4, 2), (10, 4, 0), (10, 4, 3), (37, 8, 7), (101, 16, 7),
                                         (64, 16, 7), (20664, 2048, 93), (17, 5, 40), (9, 9, 1)])
def test_windows_cover_once_with_the_halo(n, tile, halo):
    wins = tiling.windows(n, tile, halo)
    kept = np.zeros(n, int)
    for w in wins:
        assert 0 <= w.a <= w.s < w.e <= w.b <= n
        assert w.e - w.s <= tile or len(wins) == 1
        assert w.s - w.a >= halo or w.a == 0, w  # context on the left, or the true start
        assert w.b - w.e >= halo or w.b == n, w
        kept[w.s:w.e] += 1
    assert (kept == 1).all()
    assert len({w.b - w.a for w in wins}) == 1  # one window length: shapes repeat
    sizes = [w.e - w.s for w in wins]
    assert max(sizes) - min(sizes) <= 1  # balanced
    if n > tile + 2 * halo:
        assert len(wins) == -(-n // tile)


def test_windows_reject_bad_arguments():
    assert tiling.windows(0, 4, 1) == []
    with pytest.raises(ValueError):
        tiling.windows(10, 0, 1)
    with pytest.raises(ValueError):
        tiling.windows(10, 4, -1)


def test_receptive_fields_from_the_configs():
    real = DCAEConfig.from_dict(DCAE_REAL)
    assert tiling.dcae_attention_stages(real) == 1  # only the 1024-channel stage has attention
    # backwards from conv_out: 1 + 6 (+1 up conv) -> /2 = 4; +6+1 -> /2 = 6; +6+1 -> /2 = 7
    assert tiling.dcae_up_halo(real) == 7 and tiling.dcae_up_factor(real) == 8
    deeper = DCAEConfig.from_dict(dict(DCAE_REAL, decoder_layers_per_block=[1, 2, 3, 3]))
    # 1 + 2 -> ceil(4/2) = 2; + 4 -> ceil(7/2) = 4; + 6 -> ceil(11/2) = 6
    assert tiling.dcae_up_halo(deeper) == 6
    two = DCAEConfig.from_dict(dict(DCAE_REAL, decoder_block_types=["ResBlock", "ResBlock",
                                                                    "EfficientViTBlock", "EfficientViTBlock"]))
    assert tiling.dcae_attention_stages(two) == 2 and tiling.dcae_up_factor(two) == 4
    assert tiling.vocoder_halo(VocoderConfig.from_dict(VOCODER_REAL)) == 93
    # the backbone: 3 (stem) + 18 blocks x 3; the head the rest, rounded up on its own
    assert tiling.vocoder_backbone_halo(VocoderConfig.from_dict(VOCODER_REAL)) == 57
    assert tiling.vocoder_head_halo(VocoderConfig.from_dict(VOCODER_REAL)) == 36
    tiny = VocoderConfig.from_dict(read_config(CHECKPOINT, "vocoder"))
    assert tiling.vocoder_halo(tiny) == 41


@pytest.fixture(scope="module")
def decoder():
    return dcae.load(CHECKPOINT, parts=("decoder",)).decoder


def _up_tiled(dec, h, tile, halo):
    f = tiling.dcae_up_factor(dec.config)
    parts = [np.array(dec.up(h[:, :, w.a:w.b]))[:, :, (w.s - w.a) * f:(w.e - w.a) * f]
             for w in tiling.windows(h.shape[2], tile, halo)]
    return np.concatenate(parts, axis=2)


@pytest.mark.parametrize("T", [37, 64, 101])
def test_dcae_upper_half_in_tiles_is_exact(decoder, T):
    """Odd and even lengths, several tiles and a short last one: the convolution-only half gives
    the whole-length values to float rounding (bit for bit with some BLAS kernels; others block a
    GEMM by its length, which reorders sums). The halo is tight: see the next test."""
    rng = np.random.default_rng(T)
    z = mx.array(rng.standard_normal((1, 16, T, 8)).astype(np.float32))
    h = decoder.low(z)
    whole = np.array(decoder.up(h))
    halo = tiling.dcae_up_halo(decoder.config)
    scale = np.abs(whole).max()
    for tile in (8, 13, 30):
        assert np.abs(_up_tiled(decoder, h, tile, halo) - whole).max() <= 1e-6 * scale, tile


def test_dcae_halo_bounds_the_influence(decoder):
    """A change at one latent-resolution frame moves mel frames within the halo only."""
    rng = np.random.default_rng(5)
    h = rng.standard_normal((1, 16, 40, decoder.conv_in.weight.shape[0])).astype(np.float32)
    bumped = h.copy()
    t0 = 20
    bumped[:, :, t0] += 3.0
    diff = np.abs(np.array(decoder.up(mx.array(bumped))) - np.array(decoder.up(mx.array(h))))
    frames = np.nonzero(diff.max(axis=(0, 1, 3)))[0]
    halo, f = tiling.dcae_up_halo(decoder.config), tiling.dcae_up_factor(decoder.config)
    assert frames.min() >= (t0 - halo) * f and frames.max() < (t0 + halo + 1) * f
    assert frames.min() < (t0 - halo + 1) * f or frames.max() >= (t0 + halo) * f  # tight


@pytest.mark.parametrize("T,tile,low_tile", [(37, 8, 8), (64, 16, 5), (101, 30, 1000), (101, 1000, 7)])
def test_dcae_tiled_decoder_equals_whole(decoder, T, tile, low_tile):
    """The whole tiled decoder, attention included (two passes over windows: only the order of
    its sums differs), against the whole-length run."""
    rng = np.random.default_rng(T + tile)
    z = mx.array(rng.standard_normal((1, 16, T, 8)).astype(np.float32))
    whole = np.array(decoder(z))
    tiled = np.array(decoder.tiled(z, tile, low_tile))
    assert tiled.shape == whole.shape
    assert np.abs(tiled - whole).max() <= 1e-5 * np.abs(whole).max()
    if low_tile >= T:  # the attention half untiled: only the convolutions' rounding remains
        assert np.abs(tiled - whole).max() <= 1e-6 * np.abs(whole).max()


@pytest.mark.parametrize("T,tile", [(37, 8), (40, 3)])
def test_dcae_low_stage_blocks_in_windows(T, tile):
    """Each kind of block the low-resolution stages may hold, windowed and assembled in place,
    against the block run whole (a ResBlock there is not in ACE-Step's config, but a config may
    put one after an attention stage)."""
    rng = np.random.default_rng(T)
    h = mx.array(rng.standard_normal((1, 4, T, 16)).astype(np.float32))
    for blk in (dcae.ResBlock(16), dcae.EfficientViTBlock(16, 8, (5,))):
        blk.update(tree_map(lambda a: mx.array(rng.standard_normal(a.shape).astype(np.float32) * 0.3),
                            blk.parameters()))
        whole = np.array(blk(h))
        tiled = np.array(dcae._tiled_block(blk, h, T, tile))
        assert tiled.shape == whole.shape
        assert np.abs(tiled - whole).max() <= 1e-5 * np.abs(whole).max(), type(blk).__name__


def test_dcae_golden_in_small_tiles():
    """The reference's own mel through the tiled path (tiles of 4 and 3 latent frames)."""
    g = golden("dcae_decode")
    model = dcae.load(CHECKPOINT, parts=("decoder",))
    mel = np.array(model.decode_latents(g["in.latents"], tile=4, low_tile=3))
    ref = np.stack([g["vocoder.0.in.mel"], g["vocoder.1.in.mel"]], axis=1)
    assert np.abs(mel - ref).max() <= 1e-4


@pytest.mark.parametrize("tile,low_tile", [(4, 3), (5, 8), (16, 16)])
def test_dcae_encoder_in_windows_equals_the_whole_run(tile, low_tile):
    """The encoder's convolution stages over windows on its stride grid with the exact halo, the
    attention stage block by block, against the whole-length encoder (tiny DCAE, random mel
    long enough for several windows, weights scaled up so edge effects would show)."""
    model = dcae.load(CHECKPOINT, parts=("encoder",))
    enc = model.encoder
    rng = np.random.default_rng(7)
    enc.update(tree_map(lambda a: a * 1.5, enc.parameters()))
    x = mx.array(rng.standard_normal((1, 128, 8 * 37, 2)).astype(np.float32))
    whole = np.array(enc(x))
    tiled = np.array(enc.tiled(x, tile, low_tile))
    assert tiled.shape == whole.shape == (1, 16, 37, 8)
    assert np.abs(tiled - whole).max() <= 1e-5 * np.abs(whole).max()


def test_dcae_encoder_halo_is_needed(monkeypatch):
    """With no halo the windows' zero padding reaches the kept frames: the test above can fail."""
    model = dcae.load(CHECKPOINT, parts=("encoder",))
    x = mx.array(np.random.default_rng(8).standard_normal((1, 128, 8 * 37, 2)).astype(np.float32))
    whole = np.array(model.encoder(x))
    monkeypatch.setattr(dcae, "dcae_down_halo", lambda cfg: 0)
    tiled = np.array(model.encoder.tiled(x, 4, 3))
    assert np.abs(tiled - whole).max() > 1e-3 * np.abs(whole).max()


def test_dcae_down_halo_from_the_config():
    """ACE-Step's encoder: conv_in 1 + stage 0 2x2x1 + its stride-2 conv 1 + stage 1 2x2x2 +
    2 + stage 2 3x2x4 + 4 = 44 mel frames, 6 frames at the stride-8 output."""
    cfg = DCAEConfig()
    assert tiling.dcae_down_stages(cfg) == 3 and tiling.dcae_down_factor(cfg) == 8
    assert tiling.dcae_down_halo(cfg) == 6
