import pytest

from lofi.errors import INVALID_DURATION, INVALID_PARAMS, LofiError
from lofi.params import GenerateParams


def test_track_id_is_stable_and_covers_what_changes_audio():
    a = GenerateParams("lofi", 10, guidance_scale=15, seed=3)
    b = GenerateParams("lofi", 10.0, guidance_scale=15.0, seed=3)
    assert a.track_id("mlx", "fp32") == b.track_id("mlx", "fp32")
    assert len(a.track_id("mlx", "fp32")) == 16
    different = [GenerateParams("lofi", 10, seed=4), GenerateParams("lofi2", 10, seed=3),
                 GenerateParams("lofi", 11, seed=3), GenerateParams("lofi", 10, seed=3, infer_steps=28),
                 GenerateParams("lofi", 10, seed=3, scheduler="heun"),
                 GenerateParams("lofi", 10, seed=3, cfg_type="cfg"),
                 GenerateParams("lofi", 10, seed=3, omega_scale=9.0)]
    ids = {p.track_id("mlx", "fp32") for p in different} | {a.track_id("mlx", "fp32")}
    assert len(ids) == len(different) + 1
    assert a.track_id("onnx", "fp32") != a.track_id("mlx", "fp32")
    assert a.track_id("mlx", "fp16") != a.track_id("mlx", "fp32")


@pytest.mark.parametrize("kwargs,code,field", [
    ({"prompt": ""}, INVALID_PARAMS, "prompt"),
    ({"prompt": "   "}, INVALID_PARAMS, "prompt"),
    ({"prompt": "x" * 1001}, INVALID_PARAMS, "prompt"),
    ({"duration_sec": 4.99}, INVALID_DURATION, "duration_sec"),
    ({"duration_sec": 240.01}, INVALID_DURATION, "duration_sec"),
    ({"duration_sec": True}, INVALID_DURATION, "duration_sec"),
    ({"infer_steps": 0}, INVALID_PARAMS, "infer_steps"),
    ({"infer_steps": 2.5}, INVALID_PARAMS, "infer_steps"),
    ({"guidance_scale": 101}, INVALID_PARAMS, "guidance_scale"),
    ({"scheduler": "ddim"}, INVALID_PARAMS, "scheduler"),
    ({"cfg_type": "apg2"}, INVALID_PARAMS, "cfg_type"),
    ({"seed": -1}, INVALID_PARAMS, "seed"),
    ({"seed": 2**64}, INVALID_PARAMS, "seed"),
    ({"use_erg_tag": 1}, INVALID_PARAMS, "use_erg_tag"),
])
def test_validation_names_the_field(kwargs, code, field):
    base = {"prompt": "lofi", "duration_sec": 30}
    base.update(kwargs)
    with pytest.raises(LofiError) as e:
        GenerateParams(**base).validate()
    assert e.value.code == code and e.value.data["field"] == field
    assert field in e.value.message


def test_edges_are_accepted():
    for d in (5, 240, 5.0, 120.5):
        GenerateParams("x", d, seed=0).validate()
    GenerateParams("x" * 1000, 5, seed=2**32 - 1, infer_steps=1, guidance_scale=0).validate()
