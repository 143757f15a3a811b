"""lofi.progress without a daemon: segment predictions from earlier jobs and the clock's
percent/eta for a job whose segment times are known exactly."""

import json
from pathlib import Path

from lofi.params import GenerateParams
from lofi.progress import Estimator, JobClock, Rates


def test_rates_fit_a_line_across_lengths_and_scale_a_single_one():
    r = Rates()
    for d, s in ((10, 3.0), (60, 13.0)):
        r.add("vocoder", d, s)
    assert abs(r.predict("vocoder", 30) - 7.0) < 1e-9  # 1 + 0.2 s per audio second
    one = Rates({"dcae": [[10.0, 4.0]], "text": [[10.0, 0.5]], "bad": [[1, 2]], "step": [[1, "x"]]})
    assert one.predict("dcae", 20) == 8.0 and one.predict("text", 20) == 0.5
    assert one.predict("step", 10) is None and "bad" not in one.obs


def test_clock_with_known_segments_tells_the_truth(tmp_path):
    est = Estimator(tmp_path)
    p = GenerateParams("x", 10.0, infer_steps=10)
    seg = {"text": 1.0, "first_step": 2.0, "step": 1.0, "dcae": 4.0, "vocoder": 8.0, "writing": 1.0}
    est.learn("k", 10.0, seg)
    assert Estimator(tmp_path).rates("k").predict("vocoder", 10.0) == 8.0  # persisted
    total = 1 + 2 + 9 + 4 + 8 + 1
    c = JobClock(Estimator(tmp_path), p, clock=lambda: 0.0, start=0.0)
    c.key = "k"
    c.update("text_encoding", None, None, 0.0, now=0.0)
    c.update("diffusion", 0, None, 0.03, now=1.0)
    for i in range(1, 6):
        c.update("diffusion", i, 10, 0.5, now=2.0 + i)
    pct, eta = c.estimate(now=7.0)
    assert eta == total - 7.0 and pct == int(100 * 7.0 / total)
    c.update("vocoder", None, None, 0.9, now=16.0)
    assert c.estimate(now=20.0) == (int(100 * 20 / total), 5.0)
    assert c.estimate(now=40.0)[0] <= 99  # a stage far over its estimate: never 100


def test_guided_steps_follow_the_samplers_window():
    from lofi.acestep.sampler.guidance import guidance_window
    from lofi.progress import guided_steps, loop_length
    for steps, interval, sched in ((27, 0.5, "euler"), (10, 0.3, "heun"), (8, 1.0, "pingpong")):
        p = GenerateParams("x", 10.0, infer_steps=steps, guidance_interval=interval, scheduler=sched)
        total = loop_length(p)
        assert total == (2 * steps - 1 if sched == "heun" else steps)
        start, end = guidance_window(steps, interval)  # from N, indexed by the loop step
        assert guided_steps(p, total) == [start <= i < end for i in range(total)]
    assert not any(guided_steps(GenerateParams("x", 10.0, guidance_scale=1.0), 27))
    assert loop_length(GenerateParams("x", 10.0, infer_steps=20, task="audio2audio", strength=0.5,
                                      src_audio="a.wav")) == 10


def test_guided_steps_are_timed_apart_from_unguided_ones(tmp_path):
    """27 steps, 1 s unguided, 2 s guided (the 14 in the window): from the unguided steps alone
    the clock expects the window at GUIDED_COST, and once both were timed, the truth."""
    from lofi.progress import GUIDED_COST, guided_steps
    p = GenerateParams("x", 10.0, infer_steps=27)
    g = guided_steps(p, 27)
    cost = [2.0 if x else 1.0 for x in g]
    c = JobClock(Estimator(None), p, clock=lambda: 0.0, start=0.0)
    c.cost_model = {"dcae": 4.0, "vocoder": 10.0}
    c.update("diffusion", 0, 27, 0.0, now=0.0)
    t = 1.0
    c.update("diffusion", 1, 27, 0.0, now=t)
    for s in range(2, 7):  # unguided steps 2..6
        t += cost[s - 1]
        c.update("diffusion", s, 27, 0.0, now=t)
    assert not any(g[:6]) and g[6]
    left = sum(GUIDED_COST if x else 1.0 for x in g[6:]) + 4.0 + 10.0 + 0.006 * 10
    assert abs(c.remaining(t) - left) < 1e-6
    for s in range(7, 10):
        t += cost[s - 1]
        c.update("diffusion", s, 27, 0.0, now=t)
    truth = sum(cost[9:]) + 14.0 + 0.06
    assert abs(c.remaining(t) - truth) < 1e-6
    assert c.segments(t)["step"] == 1.0 and c.segments(t)["guided"] == 2.0


def test_decoder_cost_model_scales_with_the_networks(tmp_path):
    from lofi.acestep.costs import decode_costs
    from lofi.acestep.synthetic_hf import configs
    from lofi.checkpoint import COMPONENTS
    base = {"dcae": 4.0, "vocoder": 10.0}
    tiny = Path(__file__).parent / "fixtures" / "ace_step_tiny" / "checkpoint"
    assert decode_costs(tiny, base) == base  # every network overhead-bound: the released ratios
    assert decode_costs(tmp_path / "missing", base) == base
    (tmp_path / "bad" / COMPONENTS["transformer"]).mkdir(parents=True)
    (tmp_path / "bad" / COMPONENTS["transformer"] / "config.json").write_text('{"num_layers": "x"')
    assert decode_costs(tmp_path / "bad", base) == base  # damaged: the released ratios
    cfg, _ = configs("mid")
    for comp in ("transformer", "dcae", "vocoder"):
        (tmp_path / COMPONENTS[comp]).mkdir()
        (tmp_path / COMPONENTS[comp] / "config.json").write_text(json.dumps(cfg[comp]))
    mid = decode_costs(tmp_path, base)
    # the released decoders after a DiT an eighth as deep: about eight times as many steps
    assert 6 < mid["dcae"] / base["dcae"] < 9 and 6 < mid["vocoder"] / base["vocoder"] < 9
