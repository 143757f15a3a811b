"""The radio's mix (lofi/mix.py) against an independently built expectation: equal-power
crossfades, butt joins, looping and holding while waiting, skip."""

import numpy as np
import pytest

from lofi.mix import Mixer

RNG = np.random.default_rng(7)


def track(n):
    return RNG.uniform(-0.5, 0.5, (n, 2)).astype(np.float32)


def run(m, total, block=97, feed=None):
    """Render `total` frames in odd-sized blocks; feed(frame) may enqueue/skip before a block."""
    out, events, done = [], [], 0
    while done < total:
        if feed:
            feed(m, done)
        n = min(block, total - done)
        a, ev = m.render(n)
        out.append(a)
        events += ev
        done += n
    return np.concatenate(out), events


def xfade(a_tail, b_head):
    n = len(a_tail)
    k = np.arange(n)[:, None] * (np.pi / 2 / n)
    return a_tail * np.cos(k) + b_head * np.sin(k)


def test_three_tracks_equal_power():
    A, B, C = track(1000), track(900), track(1200)
    N = 200
    m = Mixer(2, N)
    for i, t in enumerate((A, B, C)):
        m.enqueue(str(i), t)
    total = 1000 + 900 + 1200 - 2 * N
    out, ev = run(m, total + 50)
    want = np.concatenate([A[:-N], xfade(A[-N:], B[:N]), B[N:-N], xfade(B[-N:], C[:N]), C[N:]])
    # C reaches its crossfade point with nothing queued: it loops (itself crossfaded into its start)
    np.testing.assert_allclose(out[:total - N], want[:total - N], atol=1e-6)
    loop = np.concatenate([xfade(C[-N:], C[:N]), C[N:N + 50]])
    np.testing.assert_allclose(out[total - N:total + 50], loop, atol=1e-6)
    started = [(e[1], e[2]) for e in ev if e[0] == "started"]
    assert started == [("0", 0), ("1", 1000 - N), ("2", 1000 + 900 - 2 * N)]
    assert ("looped", "2", total - N) in ev and ("waiting", "2", total - N) in ev
    # power stays flat across a window of equal-level uncorrelated tracks
    g = np.arange(N) * (np.pi / 2 / N)
    assert np.allclose(np.cos(g) ** 2 + np.sin(g) ** 2, 1)


def test_linear_join_keeps_equal_audio_unchanged():
    """The continue strategy's join: B starts with A's last N frames (as a continuation does);
    a linear join of equal audio is that audio, where equal power would swell it by 3 dB."""
    A = track(1000)
    N = 120
    B = np.concatenate([A[-N:], track(700)])
    m = Mixer(2, N, curve="linear")
    m.enqueue("a", A)
    m.enqueue("b", B)
    out, _ = run(m, 1000 + 700 - N)  # then B, alone, would loop
    np.testing.assert_allclose(out, np.concatenate([A, B[N:]])[:1700 - N], atol=1e-6)
    t = (np.arange(N) / N)[:, None]
    C = track(N)
    m = Mixer(2, N, curve="linear")
    m.enqueue("a", A)
    m.enqueue("c", np.concatenate([C, track(500)]))
    out, _ = run(m, 1000)
    np.testing.assert_allclose(out[1000 - N:], A[-N:] * (1 - t) + C * t, atol=1e-6)
    with pytest.raises(ValueError):
        Mixer(2, N, curve="cubic")


def test_butt_join_is_sample_exact():
    A, B, C = track(500), track(333), track(400)
    m = Mixer(2, 0)
    for i, t in enumerate((A, B, C)):
        m.enqueue(str(i), t)
    out, ev = run(m, 1233, block=64)
    assert np.array_equal(out, np.concatenate([A, B, C]))
    assert [e[2] for e in ev if e[0] == "started"] == [0, 500, 833]


def test_loop_while_waiting_then_crossfade_in_at_once():
    A, B = track(1000), track(800)
    N = 100
    m = Mixer(2, N, "loop")
    m.enqueue("a", A)
    arrive = 1500  # inside A's second pass

    def feed(m, frame):
        if frame >= arrive and not m.upcoming and m.current == "a":
            m.enqueue("b", B)

    out, ev = run(m, 2600, block=100, feed=feed)
    # B comes in at once from where A's second pass is, and B itself loops from output 2200 on
    want = np.concatenate([A[:-N], xfade(A[-N:], A[:N]), A[N:600], xfade(A[600:700], B[:N]),
                           B[N:700]])
    np.testing.assert_allclose(out[:2200], want, atol=1e-6)
    kinds = [(e[0], e[1], e[2]) for e in ev]
    assert ("waiting", "a", 900) in kinds and ("started", "b", 1500) in kinds


def test_hold_plays_out_then_silence_then_next():
    A, B = track(600), track(300)
    m = Mixer(2, 100, "hold")
    m.enqueue("a", A)

    def feed(m, frame):
        if frame == 800:
            m.enqueue("b", B)

    out, ev = run(m, 1200, block=100, feed=feed)
    np.testing.assert_array_equal(out[:600], A)
    assert not out[600:800].any()
    np.testing.assert_array_equal(out[800:1100], B)
    assert ("waiting", "a", 500) in ev and ("ended", "a", 600) in ev


def test_skip_crossfades_now_or_when_ready():
    A, B, C = track(2000), track(2000), track(2000)
    N = 100
    m = Mixer(2, N)
    m.enqueue("a", A)
    m.enqueue("b", B)

    def feed(m, frame):
        if frame == 300:
            m.skip()  # B is queued: at once
        if frame == 700:
            m.skip()  # nothing queued: wait, keep playing B
        if frame == 1000:
            m.enqueue("c", C)

    out, ev = run(m, 1300, block=100, feed=feed)
    want = np.concatenate([A[:300], xfade(A[300:400], B[:N]), B[N:700], xfade(B[700:800], C[:N]),
                           C[N:300]])
    np.testing.assert_allclose(out, want, atol=1e-6)
    assert [e[2] for e in ev if e[0] == "started"] == [0, 300, 1000]
    assert ("waiting", "b", 700) in ev


def test_bad_audio_refused():
    m = Mixer(2, 10)
    with pytest.raises(ValueError):
        m.enqueue("x", np.zeros((10, 1), np.float32))
    with pytest.raises(ValueError):
        Mixer(2, 10, "pause")
