"""lofi.progress without a daemon: segment predictions from earlier jobs and the clock's
percent/eta for a job whose segment times are known exactly."""

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
