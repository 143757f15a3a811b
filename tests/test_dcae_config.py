"""DCAE config.json spellings: what diffusers accepts loads here too, and the weight shapes, not
the string, decide whether a checkpoint fits (issue 11: the released string is unconfirmed)."""

import json
import shutil

import numpy as np
import pytest

from lofi.acestep.configs import DCAEConfig
from lofi.acestep.synthetic_hf import configs
from lofi.errors import MODEL_LOAD_FAILED, LofiError
from tests.conftest import CHECKPOINT

REAL = configs("full")[0]["dcae"]


@pytest.mark.parametrize("spelling", ["Conv", "conv", "CONV", "strided_conv"])
def test_any_downsample_string_but_pixel_unshuffle_is_a_strided_conv(spelling):
    assert DCAEConfig.from_dict(dict(REAL, downsample_block_type=spelling)) == DCAEConfig.from_dict(REAL)


@pytest.mark.parametrize("value", ["pixel_unshuffle", None, 3])
def test_pixel_unshuffle_and_non_strings_are_refused(value):
    with pytest.raises(LofiError) as e:
        DCAEConfig.from_dict(dict(REAL, downsample_block_type=value))
    assert e.value.code == MODEL_LOAD_FAILED and "downsample_block_type" in e.value.message


@pytest.fixture
def ckpt(tmp_path):
    root = tmp_path / "ace-step"
    shutil.copytree(CHECKPOINT, root)
    return root


def _set(root, **values):
    path = root / "music_dcae_f8c8" / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(values)
    path.write_text(json.dumps(cfg))


def test_lowercase_conv_loads_the_same_network(ckpt):
    from lofi_mlx.acestep import dcae
    from mlx.utils import tree_flatten

    ref = dict(tree_flatten(dcae.load(CHECKPOINT).parameters()))
    _set(ckpt, downsample_block_type="conv")
    got = dict(tree_flatten(dcae.load(ckpt).parameters()))
    assert ref.keys() == got.keys()
    assert all(np.array_equal(np.asarray(ref[k]), np.asarray(got[k])) for k in ref)


def test_weights_of_the_pixel_unshuffle_variant_fail_the_shape_check(ckpt):
    """A pixel-unshuffle encoder has 4x fewer output channels in its down convs: whatever the
    config string says, the weight-shape check names the tensor."""
    from safetensors.numpy import load_file, save_file

    from lofi_mlx.acestep import dcae

    path = ckpt / "music_dcae_f8c8" / "diffusion_pytorch_model.safetensors"
    w = load_file(path)
    key = "encoder.down_blocks.1.2.conv.weight"
    w[key] = np.ascontiguousarray(w[key][: w[key].shape[0] // 4])
    w[key.replace("weight", "bias")] = np.ascontiguousarray(w[key.replace("weight", "bias")][: w[key].shape[0]])
    save_file(w, path, metadata={"format": "pt"})
    _set(ckpt, downsample_block_type="conv")
    with pytest.raises(LofiError) as e:
        dcae.load(ckpt)
    assert e.value.code == MODEL_LOAD_FAILED and "encoder.down_blocks.1.2.conv" in e.value.message
