"""How far a job's progress notifications are from the truth, measured on the client side:
for each generation_progress (from step `from_step` on), the share of the job's wall time that
had passed when it arrived against `percent`, and the time actually left against `eta_sec`."""

from __future__ import annotations


def truth_errors(d, track_id: str, from_step: int = 3) -> list[tuple[float, float]]:
    """[(percent error in points, eta error as a share of the job's time)] per notification;
    the job runs from its generation_start to its generation_complete, as the client sees it."""
    start = [t for t, p in d.events("generation_start", track_id, with_times=True)][0]
    end = [t for t, p in d.events("generation_complete", track_id, with_times=True)][0]
    total = end - start
    out = []
    for t, p in d.events("generation_progress", track_id, with_times=True):
        if p["stage"] == "diffusion" and p["step"] < from_step or p["stage"] == "text_encoding":
            continue
        true_pct = 100 * (t - start) / total
        eta_err = abs(p["eta_sec"] - (end - t)) / total if p["eta_sec"] is not None else 1.0
        out.append((abs(p["percent"] - true_pct), eta_err))
    return out
