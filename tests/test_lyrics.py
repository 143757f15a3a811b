"""`lyrics`: "[inst]" (default) through the lyric path, "" as the reference's empty-lyrics path,
anything else refused. The golden run is the reference's text2music with lyrics "[inst]"
(tests/fixtures/ace_step_tiny_modes, copied from ../shared/golden/ace_step_tiny_modes)."""

import json
from pathlib import Path

import numpy as np
import pytest

from lofi.acestep.text import lyric_tokens
from lofi.checkpoint import load_safetensors
from lofi.errors import INVALID_PARAMS, LofiError
from lofi.params import GenerateParams
from tests.conftest import CHECKPOINT, GOLDEN, assert_close

MODES = Path(__file__).parent / "fixtures" / "ace_step_tiny_modes"


def test_inst_tokenises_as_the_reference():
    case = next(c for c in json.loads((GOLDEN / "lyrics_tokenize.json").read_text())["cases"]
                if c["lyrics"] == "[inst]")
    ids, mask = lyric_tokens("[inst]")
    assert ids.tolist() == [case["token_ids"]] == [[261, 259, 6688, 2]]
    assert mask.tolist() == [[1, 1, 1, 1]] and ids.dtype == mask.dtype == np.int64


def test_empty_lyrics_is_the_reference_empty_path():
    ids, mask = lyric_tokens("")
    assert ids.tolist() == [[0]] and mask.tolist() == [[0]]


@pytest.mark.parametrize("text", ["[verse]\nla la", "[instrumental]", " [inst]", "inst"])
def test_other_lyrics_are_refused(text):
    with pytest.raises(LofiError) as e:
        lyric_tokens(text)
    assert e.value.code == INVALID_PARAMS
    with pytest.raises(LofiError) as e:
        GenerateParams("lofi", 10.0, lyrics=text).validate()
    assert e.value.code == INVALID_PARAMS and e.value.data == {"field": "lyrics"}


def test_default_is_inst_and_part_of_the_track_id():
    p = GenerateParams("lofi", 10.0, seed=1).validate()
    assert p.lyrics == "[inst]"
    assert p.track_id("mlx", "fp32") != GenerateParams("lofi", 10.0, seed=1, lyrics="").track_id("mlx", "fp32")
    with pytest.raises(LofiError):
        GenerateParams("lofi", 10.0, lyrics=None).validate()


def test_cli_lyrics_flag():
    from lofi.cli import _given, build_parser
    from lofi.params import GenerateParams
    base = ["generate", "--prompt", "x", "--duration", "5", "--out", "o.wav"]

    def lyrics(argv):  # what `lofi generate` asks for (not given: GenerateParams' default)
        return GenerateParams(prompt="x", duration_sec=5, **_given(build_parser().parse_args(argv))).lyrics
    assert lyrics(base) == "[inst]"
    assert lyrics(base + ["--lyrics", ""]) == ""


def test_inst_golden_run_through_the_pipeline():
    """Reference __call__ with lyrics "[inst]": the lyric ids the pipeline feeds, the latents
    after the whole loop and the 48 kHz wave, with the recorded noise injected."""
    from lofi.audio import resample
    from lofi.acestep.pipeline import Pipeline
    from lofi.acestep.sampler.noise import InjectedNoise
    from lofi.engines import create_engine

    entry = json.loads((MODES / "manifest.json").read_text())["files"]["text2music_inst.safetensors"]
    g = load_safetensors(MODES / "text2music_inst.safetensors")
    p = entry["input_params_json"]
    assert p["lyrics"] == "[inst]" and p["task"] == "text2music"
    ids, mask = lyric_tokens(p["lyrics"])
    assert np.array_equal(ids, g["encode.0.in.lyric_token_idx"])
    assert np.array_equal(mask, g["encode.0.in.lyric_mask"])

    engine = create_engine(CHECKPOINT, "mlx", "fp32", "cpu")
    pipe = Pipeline(CHECKPOINT, engine)
    params = GenerateParams(p["prompt"], 5.0, infer_steps=p["infer_step"], lyrics=p["lyrics"],
                            guidance_scale=p["guidance_scale"], omega_scale=p["omega_scale"])
    seen = []
    real = engine.encode_context

    def spy(text, text_mask, lyric_ids, lyric_mask, erg_lyric=False):
        seen.append((np.asarray(lyric_ids).tolist(), np.asarray(lyric_mask).tolist()))
        return real(text, text_mask, lyric_ids, lyric_mask, erg_lyric=erg_lyric)

    engine.encode_context = spy
    # the golden's 2.4 s is below the product's 5 s minimum, so T is given explicitly
    lat = pipe.latents(params, noise_source=InjectedNoise([g["randn_tensor.0"]]),
                       frames=g["randn_tensor.0"].shape[-1])
    assert seen and all(s == ([[261, 259, 6688, 2]], [[1, 1, 1, 1]]) for s in seen)
    assert_close(lat, g["out.latents"], 1e-3, "latents")
    wave = pipe.audio_44k(lat)
    assert_close(resample(wave, 44100, 48000), g["out.wav_48000"].reshape(2, -1), 1e-3, "wave 48k")
