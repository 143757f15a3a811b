"""`python -m lofi.verify GOLDEN_DIR`: check an engine against a reference golden set.

Driven by the set's manifest.json: every file it lists is checked through the Engine interface
and the shared sampler/audio code, so any set in that format (other sizes, seeds, prompts,
durations) works, and the ONNX engine reuses this module unchanged (`lofi_cuda.verify`).
Prints one line per golden: max abs error, tolerance, PASS/FAIL. Exit 0 only if all pass.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from lofi.checkpoint import load_safetensors
from lofi.verify_modes import CHECKERS as MODE_CHECKERS

# Tolerance = atol + rtol * max|reference|. fp32: absolute, as the issue sets them. Reduced
# precision: relative to the tensor's scale (documented in README "Precision").
TOLERANCES = {
    "fp32": {"module": (1e-4, 0.0), "run": (1e-3, 0.0), "exact": (0.0, 0.0)},
    "fp16": {"module": (0.0, 2e-2), "run": (0.0, 5e-2), "exact": (0.0, 0.0)},
    "bf16": {"module": (0.0, 8e-2), "run": (0.0, 2e-1), "exact": (0.0, 0.0)},
}


class Report:
    def __init__(self, precision: str, out=sys.stdout):
        self.tol = TOLERANCES[precision]
        self.rows: list[tuple[str, float, float, bool]] = []
        self.deviations: list[tuple[str, str]] = []
        self.out = out

    def check(self, name: str, actual, expected, kind: str = "module"):
        actual = np.asarray(actual, np.float64)
        expected = np.asarray(expected, np.float64)
        atol, rtol = self.tol[kind]
        tol = atol + rtol * (float(np.max(np.abs(expected))) if expected.size else 0.0)
        if actual.shape != expected.shape:
            self._row(name, float("inf"), tol, False, f"shape {actual.shape} != {expected.shape}")
            return
        err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
        ok = bool(np.all(np.isfinite(actual))) and err <= tol
        self._row(name, err, tol, ok)

    def fail(self, name: str, why: str):
        self._row(name, float("nan"), float("nan"), False, why)

    def deviation(self, name: str, why: str):
        """A documented, deliberate difference from the reference: listed, never a pass."""
        self.deviations.append((name, why))
        print(f"DEVIATION  {name:<52} ({why})", file=self.out, flush=True)

    def _row(self, name, err, tol, ok, note=""):
        self.rows.append((name, err, tol, ok))
        print(f"{'PASS' if ok else 'FAIL'}  {name:<58} err {err:10.3e}  tol {tol:9.2e}"
              + (f"  ({note})" if note else ""), file=self.out, flush=True)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r[3] for r in self.rows)


# -- helpers ------------------------------------------------------------------------------------

def _calls(entry: dict, kind: str) -> list[dict]:
    return [c for c in entry.get("calls", []) if c.get("call", "").endswith(kind)]


def _hooked(call: dict) -> bool:
    return any(k.startswith("erg_") and v for k, v in call.items())


def _sampler_params(args: dict, infer_steps: int | None = None):
    from lofi.acestep.sampler.loop import SamplerParams
    return SamplerParams(
        infer_steps=int(infer_steps if infer_steps is not None else args["infer_steps"]),
        guidance_scale=float(args["guidance_scale"]),
        scheduler_type=args["scheduler_type"], cfg_type=args["cfg_type"],
        omega_scale=float(args["omega_scale"]), guidance_interval=float(args["guidance_interval"]),
        guidance_interval_decay=float(args["guidance_interval_decay"]),
        min_guidance_scale=float(args["min_guidance_scale"]),
        use_erg_tag=bool(args.get("use_erg_tag", True)),
        use_erg_lyric=bool(args["use_erg_lyric"]), use_erg_diffusion=bool(args["use_erg_diffusion"]),
        guidance_scale_text=float(args.get("guidance_scale_text", 0.0)),
        guidance_scale_lyric=float(args.get("guidance_scale_lyric", 0.0)))


# -- checkers, one per kind of golden file ------------------------------------------------------

def check_text_encoder(ctx, name, entry, g, rep):
    from lofi.acestep.text import PromptTokenizer
    tok = PromptTokenizer.from_checkpoint(ctx.checkpoint)
    prompts = entry["arguments"]["prompts"]
    for case, ps in (("single", prompts[:1]), ("batch", prompts)):
        if f"{case}.input_ids" not in g:
            continue
        ids, mask = tok.encode(ps, max_length=int(entry["arguments"].get("text_max_length", 256)))
        rep.check(f"{name}:{case}.input_ids", ids, g[f"{case}.input_ids"], "exact")
        rep.check(f"{name}:{case}.attention_mask", mask, g[f"{case}.attention_mask"], "exact")
        ids, mask = g[f"{case}.input_ids"], g[f"{case}.attention_mask"]
        rep.check(f"{name}:{case}.last_hidden_state", ctx.engine.encode_text(ids, mask),
                  g[f"{case}.last_hidden_state"])
        rep.check(f"{name}:{case}.last_hidden_state_null",
                  ctx.engine.encode_text(ids, mask, erg=True), g[f"{case}.last_hidden_state_null"])


def _zero_speaker(g, key, rep, name) -> bool:
    if key in g and np.any(g[key] != 0):
        rep.fail(name, "non-zero speaker embeddings are not supported (v1 always passes zeros)")
        return False
    return True


def check_transformer(ctx, name, entry, g, rep):
    e = ctx.engine
    if not _zero_speaker(g, "in.speaker_embeds", rep, name):
        return
    x, t = g["in.hidden_states"], g["in.timestep"]
    tm, lid, lm = g["in.text_attention_mask"], g["in.lyric_token_idx"], g["in.lyric_mask"]
    none = np.zeros(x.shape[0], bool)
    c, cm = e.encode_context(g["in.encoder_text_hidden_states"], tm, lid, lm)
    rep.check(f"{name}:encode.encoder_hidden_states", c, g["encode.out.encoder_hidden_states"])
    rep.check(f"{name}:encode.encoder_hidden_mask", cm, g["encode.out.encoder_hidden_mask"], "exact")
    rep.check(f"{name}:decode.sample", e.velocity(x, t, g["encode.out.encoder_hidden_states"],
                                                  g["encode.out.encoder_hidden_mask"], none),
              g["decode.out.sample"])
    rep.check(f"{name}:forward.sample", e.velocity(x, t, c, cm, none), g["forward.out.sample"])
    if "encode_erg.out.encoder_hidden_states" in g:
        ce, _ = e.encode_context(g["encode_erg.in.encoder_text_hidden_states"], tm, lid, lm,
                                 erg_lyric=True)
        rep.check(f"{name}:encode_erg.encoder_hidden_states", ce,
                  g["encode_erg.out.encoder_hidden_states"])
        rep.check(f"{name}:decode_erg.sample",
                  e.velocity(x, t, g["encode_erg.out.encoder_hidden_states"],
                             g["encode.out.encoder_hidden_mask"], ~none),
                  g["decode_erg.out.sample"])
    if "encode_zero.out.encoder_hidden_states" in g:
        cz, _ = e.encode_context(np.zeros_like(g["in.encoder_text_hidden_states"]), tm,
                                 np.zeros_like(lid), lm)
        rep.check(f"{name}:encode_zero.encoder_hidden_states", cz,
                  g["encode_zero.out.encoder_hidden_states"])
    if "lyrics.forward.out.sample" in g:
        cl, cml = e.encode_context(g["in.encoder_text_hidden_states"], tm,
                                   g["lyrics.in.lyric_token_idx"], g["lyrics.in.lyric_mask"])
        rep.check(f"{name}:lyrics.encode.encoder_hidden_states", cl,
                  g["lyrics.encode.out.encoder_hidden_states"])
        rep.check(f"{name}:lyrics.encode.encoder_hidden_mask", cml,
                  g["lyrics.encode.out.encoder_hidden_mask"], "exact")
        rep.check(f"{name}:lyrics.forward.sample", e.velocity(x, t, cl, cml, none),
                  g["lyrics.forward.out.sample"])


def check_schedulers(ctx, name, entry, g, rep):
    from lofi.acestep.sampler.noise import InjectedNoise
    from lofi.acestep.sampler.schedules import make_step, timesteps_sigmas
    keys = sorted({k.rsplit(".", 1)[0] for k in g if k.endswith(".timesteps") and "steploop" not in k})
    for prefix in keys:  # e.g. euler.n27, heun.sigma_max0.5.n30
        m = re.fullmatch(r"(\w+)\.(?:sigma_max([0-9.]+)\.)?n(\d+)", prefix)
        if m is None:
            rep.fail(f"{name}:{prefix}", "unrecognised schedule name")
            continue
        sched, sigma_max, n = m.group(1), float(m.group(2) or 1.0), int(m.group(3))
        t, s = timesteps_sigmas(sched, n, sigma_max=sigma_max)
        rep.check(f"{name}:{prefix}.timesteps", t, g[f"{prefix}.timesteps"])
        rep.check(f"{name}:{prefix}.sigmas", s, g[f"{prefix}.sigmas"])
    omega = float(entry["arguments"].get("omega", 10.0))
    for sched in sorted({k.split(".")[0] for k in g if ".steploop." in k}):
        steps = sorted({int(k.split(".")[2]) for k in g if k.startswith(f"{sched}.steploop.")
                        and k.split(".")[2].isdigit()})
        count = len(steps)
        n = (count + 1) // 2 if sched == "heun" else count
        t, s = timesteps_sigmas(sched, n)
        noise = InjectedNoise([g[f"{sched}.steploop.{i}.noise"] for i in steps
                               if f"{sched}.steploop.{i}.noise" in g])
        step = make_step(sched, s, omega, noise)
        x = g[f"{sched}.steploop.sample0"]
        for i in steps:
            rep.check(f"{name}:{sched}.steploop.{i}.timestep", t[i:i + 1],
                      g[f"{sched}.steploop.{i}.timestep"])
            x = step(g[f"{sched}.steploop.{i}.model_output"], x, i)
            rep.check(f"{name}:{sched}.steploop.{i}.prev_sample", x,
                      g[f"{sched}.steploop.{i}.prev_sample"])


def check_guidance(ctx, name, entry, g, rep):
    from lofi.acestep.sampler.guidance import MomentumBuffer, apg, cfg, cfg_double, cfg_star
    args = entry["arguments"]
    scale = float(args.get("guidance_scale", 15.0))
    for seq in sorted({k.split(".")[1] for k in g if k.startswith("apg.")}):
        mb = MomentumBuffer()
        i = 0
        while f"apg.{seq}.{i}.out" in g:
            p = f"apg.{seq}.{i}"
            out = apg(g[f"{p}.pred_cond"], g[f"{p}.pred_uncond"], scale, mb,
                      eta=float(args.get("apg_eta", 0.0)),
                      norm_threshold=float(args.get("apg_norm_threshold", 2.5)))
            rep.check(f"{name}:{p}.out", out, g[f"{p}.out"])
            rep.check(f"{name}:{p}.running_average", mb.running_average, g[f"{p}.running_average"])
            i += 1
    i = 0
    while f"cfg.{i}.out" in g:
        rep.check(f"{name}:cfg.{i}.out", cfg(g[f"cfg.{i}.cond"], g[f"cfg.{i}.uncond"], scale),
                  g[f"cfg.{i}.out"])
        i += 1
    i = 0
    while f"cfg_star.{i}.out" in g:
        rep.check(f"{name}:cfg_star.{i}.out",
                  cfg_star(g[f"cfg_star.{i}.cond"], g[f"cfg_star.{i}.uncond"], scale, i),
                  g[f"cfg_star.{i}.out"])
        i += 1
    if "cfg_double.out" in g:
        desc = entry["tensors"]["cfg_double.out"]["description"]
        gt = float(desc.split("guidance_scale_text=")[1].split(",")[0])
        gl = float(desc.split("guidance_scale_lyric=")[1].split(")")[0])
        rep.check(f"{name}:cfg_double.out",
                  cfg_double(g["cfg_double.cond"], g["cfg_double.uncond"],
                             g["cfg_double.only_text_cond"], gt, gl), g["cfg_double.out"])


def _check_encode_and_decode_calls(ctx, name, entry, g, rep):
    """Teacher-forced single calls: every recorded encode and decode, from its recorded inputs."""
    e = ctx.engine
    encs = _calls(entry, ".encode")
    for c in encs:
        n = c["index"]
        p = f"encode.{n}"
        out, _ = e.encode_context(g[f"{p}.in.encoder_text_hidden_states"], g[f"{p}.in.text_attention_mask"],
                                  g[f"{p}.in.lyric_token_idx"], g[f"{p}.in.lyric_mask"],
                                  erg_lyric=_hooked(c))
        rep.check(f"{name}:{p}.encoder_hidden_states", out, g[f"{p}.out.encoder_hidden_states"])
    mask = g["encode.0.out.encoder_hidden_mask"]
    for c in _calls(entry, ".decode"):
        k = c["index"]
        src = c.get("encoder_hidden_states_from_encode_call", 0)
        v = e.velocity(g[f"decode.{k}.in.hidden_states"], g[f"decode.{k}.in.timestep"],
                       g[f"encode.{src}.out.encoder_hidden_states"], mask,
                       np.full(g[f"decode.{k}.in.hidden_states"].shape[0], _hooked(c)))
        rep.check(f"{name}:decode.{k}.sample", v, g[f"decode.{k}.out.sample"])


def _whole_run(ctx, args, g, text, text_null, mask, noise):
    from lofi.acestep.sampler.loop import build_conditions, sample
    sp = _sampler_params(args)
    lyric_ids = np.zeros((text.shape[0], 1), np.int64)
    conds = build_conditions(ctx.engine, text, text_null, mask, lyric_ids, np.zeros_like(lyric_ids), sp)
    return sample(ctx.engine, conds, noise.randn(g["randn_tensor.0"].shape), sp, noise)


def check_diffusion(ctx, name, entry, g, rep):
    from lofi.acestep.sampler.noise import InjectedNoise
    args = entry["arguments"]
    if len(str(args.get("lyric_token_ids", "[[0]]")).strip("[] ()emptylrics")) > 1:
        rep.fail(name, "only empty-lyrics runs are supported")
        return
    _check_encode_and_decode_calls(ctx, name, entry, g, rep)
    steps = sorted({int(k.split(".")[1]) for k in g if k.startswith("step.") and k.endswith(".noise")})
    noise = InjectedNoise([g["randn_tensor.0"]] + [g[f"step.{i}.noise"] for i in steps])
    lat = _whole_run(ctx, args, g, g["in.encoder_text_hidden_states"],
                     g.get("in.encoder_text_hidden_states_null"), g["in.text_attention_mask"], noise)
    rep.check(f"{name}:whole run latents", lat, g["out.latents"], "run")


def check_dcae_decode(ctx, name, entry, g, rep):
    from lofi.audio import resample
    e = ctx.engine
    mel = e.dcae_decode(g["in.latents"])
    last = mel[-1:]
    rep.check(f"{name}:dcae.decoder.out", ((last + 11.0) / 14.0 - 0.5) / 0.5, g["dcae.decoder.out"], "run")
    for ch in (0, 1):
        key = f"vocoder.{ch}.in.mel"
        if key in g:
            rep.check(f"{name}:{key}", mel[0, ch][None], g[key], "run")
    wave = e.vocode(mel)
    for b in range(wave.shape[0]):
        rep.check(f"{name}:out.wav_44100.{b}", wave[b], g[f"out.wav_44100.{b}"], "run")
        rep.check(f"{name}:out.wav_48000.{b}", resample(wave[b], 44100, 48000),
                  g[f"out.wav_48000.{b}"], "run")
    # the vocoder alone on the recorded mel isolates it from the DCAE
    solo = e.vocode(np.stack([g["vocoder.0.in.mel"][0], g["vocoder.1.in.mel"][0]])[None])
    rep.check(f"{name}:vocoder(recorded mel)", solo[0], g["out.wav_44100.0"], "run")


def check_dcae_encode(ctx, name, entry, g, rep):
    from lofi.audio import log_mel, prepare_for_encode
    for case in sorted({k.split(".")[0] for k in g}):
        sr = 48000 if "48" in case else 44100
        audio = g[f"{case}.in.audios"][0]
        padded = prepare_for_encode(audio, sr)
        rep.check(f"{name}:{case}.resampled_padded_audio", padded, g[f"{case}.resampled_padded_audio"][0])
        mel = log_mel(g[f"{case}.resampled_padded_audio"][0])
        rep.check(f"{name}:{case}.mel", mel, g[f"{case}.mel"][0])
        lat = ctx.engine.dcae_encode(g[f"{case}.mel"])
        # A whole network deep (15 blocks): in half precision its ReLU linear attention flips
        # near-zero queries between 0 and a mean of V, so it gets the whole-run bound.
        rep.check(f"{name}:{case}.latents", lat, g[f"{case}.out.latents"], "run")


def check_vocoder(ctx, name, entry, g, rep):
    from lofi.audio import linear_spectrogram, log_mel, mel_filterbank
    out = ctx.engine.vocode(g["decode.in.mel"][None])
    rep.check(f"{name}:decode.out", out[0], g["decode.out"][0])
    if "mel_transform.out.log_mel" in g:
        rep.check(f"{name}:mel_transform.mel_fb", mel_filterbank(), g["mel_transform.mel_fb"])
        rep.check(f"{name}:mel_transform.linear", linear_spectrogram(g["mel_transform.in.wave"]),
                  g["mel_transform.linear"])
        ours, ref = log_mel(g["mel_transform.in.wave"]), g["mel_transform.out.log_mel"]
        # Near the magnitude floor (sqrt(1e-6)) the log amplifies the reference's own fp32 FFT
        # rounding (~0.2%); compare the log where the band carries sound, the linear mel everywhere.
        audible = ref > -6.0
        rep.check(f"{name}:mel_transform.log_mel (bins > e^-6)", ours[audible], ref[audible])
        rep.check(f"{name}:mel_transform.mel (linear, all bins)", np.exp(ours), np.exp(ref))


def check_resample(ctx, name, entry, g, rep):
    from lofi.audio import resample
    for key in sorted(k for k in g if k.endswith(".in")):
        a, b = key[1:-3].split("_")
        rep.check(f"{name}:{key[:-3]}", resample(g[key], int(a), int(b)), g[key[:-3] + ".out"])


def check_end_to_end(ctx, name, entry, g, rep):
    from lofi.audio import resample
    from lofi.acestep.sampler.noise import InjectedNoise
    from lofi.acestep.text import PromptTokenizer
    p = entry["input_params_json"]
    if p.get("lyrics") or p.get("task", "text2music") != "text2music":
        rep.fail(name, "only instrumental text2music runs are supported")
        return
    e = ctx.engine
    ids, mask = PromptTokenizer.from_checkpoint(ctx.checkpoint).encode([p["prompt"]])
    rep.check(f"{name}:text.input_ids", ids, g["text.input_ids"], "exact")
    text = e.encode_text(ids, mask)
    rep.check(f"{name}:text.last_hidden_state", text, g["text.last_hidden_state"])
    null = e.encode_text(ids, mask, erg=True) if p.get("use_erg_tag", True) else None
    if null is not None and "text.last_hidden_state_null" in g:
        rep.check(f"{name}:text.last_hidden_state_null", null, g["text.last_hidden_state_null"])
    args = dict(p, infer_steps=p["infer_step"])
    lat = _whole_run(ctx, args, g, text, null, mask, InjectedNoise([g["randn_tensor.0"]]))
    rep.check(f"{name}:diffusion latents", lat, g["diffusion.out.latents"], "run")
    mel = e.dcae_decode(lat)
    wave = e.vocode(mel)[0]
    rep.check(f"{name}:out.wav_44100", wave, g["out.wav_44100"].reshape(wave.shape), "run")
    rep.check(f"{name}:out.wav_48000", resample(wave, 44100, 48000),
              g["out.wav_48000"].reshape(2, -1), "run")


CHECKERS = [
    *MODE_CHECKERS,
    ("text_encoder", check_text_encoder), ("transformer", check_transformer),
    ("schedulers", check_schedulers), ("guidance", check_guidance),
    ("diffusion_", check_diffusion), ("dcae_decode", check_dcae_decode),
    ("dcae_encode", check_dcae_encode), ("vocoder", check_vocoder),
    ("resample", check_resample), ("end_to_end", check_end_to_end),
]


def golden_checkpoint(golden_dir: Path) -> Path:
    """The set's checkpoint/ (a folder or a link to another set's byte-identical copy); a set
    copied without its link falls back to the sibling set its manifest says it was copied from."""
    own = golden_dir / "checkpoint"
    if own.is_dir():
        return own
    manifest = json.loads((golden_dir / "manifest.json").read_text())
    src = str(manifest.get("checkpoint", {}).get("copied_from", ""))
    parts = Path(src).parts
    if len(parts) >= 2 and parts[-1] == "checkpoint":
        sibling = golden_dir.parent / parts[-2] / "checkpoint"
        if sibling.is_dir():
            return sibling
    return own


class Context:
    def __init__(self, golden_dir: Path, engine, factory=None):
        self.golden_dir = golden_dir
        self.checkpoint = golden_checkpoint(golden_dir)
        self.engine = engine
        self._factory = factory  # checkpoint -> an engine like `engine` (a set's second checkpoint)
        self._others: dict = {}

    def engine_for(self, checkpoint: Path):
        if Path(checkpoint) == self.checkpoint or self._factory is None:
            return self.engine
        if checkpoint not in self._others:
            self._others[checkpoint] = self._factory(checkpoint)
        return self._others[checkpoint]


def family(manifest: dict) -> str:
    """The model family a golden set was made from: "musicgen" or "ace-step"."""
    from lofi.musicgen.verify import is_musicgen_manifest
    return "musicgen" if is_musicgen_manifest(manifest) else "ace-step"


def run(golden_dir: str | Path, engine, out=None, only: list[str] | None = None,
        factory=None) -> Report:
    golden_dir = Path(golden_dir)
    manifest = json.loads((golden_dir / "manifest.json").read_text())
    rep = Report(engine.precision, out or sys.stdout)  # the stream of the moment, not of import
    ctx = Context(golden_dir, engine, factory)
    checkers = CHECKERS
    if family(manifest) == "musicgen":
        from lofi.musicgen.verify import CHECKERS as checkers
    for fname, entry in manifest["files"].items():
        stem = fname.rsplit(".", 1)[0]
        if only and not any(stem.startswith(o) for o in only):
            continue
        checker = next((fn for prefix, fn in checkers if stem.startswith(prefix)), None)
        if not fname.endswith(".safetensors") or "/" in fname:
            continue  # lyric tokenisation (JSON; instrumental-only), the source WAV, the LoRA file
        if checker is None:
            rep.fail(stem, "no checker for this kind of golden")
            continue
        try:
            checker(ctx, stem, entry, load_safetensors(golden_dir / fname), rep)
        except Exception as ex:  # a crash in one golden must not hide the others
            rep.fail(stem, f"{type(ex).__name__}: {ex}")
    if getattr(engine, "set_lora", None) is not None:
        engine.set_lora(None)  # leave the engine as it came
    return rep


def main(argv=None, engine_name: str = "mlx") -> int:
    ap = argparse.ArgumentParser(prog=f"python -m lofi_{'mlx' if engine_name == 'mlx' else 'cuda'}.verify",
                                 description="Check the engine against a reference golden set.")
    ap.add_argument("golden_dir", type=Path)
    ap.add_argument("--precision", default="fp32", choices=sorted(TOLERANCES))
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    ap.add_argument("--only", nargs="*", help="golden name prefixes to run")
    args = ap.parse_args(argv)
    if not (args.golden_dir / "manifest.json").is_file():
        print(f"verify: {args.golden_dir} has no manifest.json", file=sys.stderr)
        return 2
    from lofi.engines import create_engine
    backend = family(json.loads((args.golden_dir / "manifest.json").read_text()))

    def factory(ckpt):
        return create_engine(ckpt, engine_name, args.precision, args.device, keep_loaded=True,
                             backend=backend)

    engine = factory(golden_checkpoint(args.golden_dir))
    t0 = time.perf_counter()
    rep = run(args.golden_dir, engine, only=args.only, factory=factory)
    n_fail = sum(not r[3] for r in rep.rows)
    devs = f", {len(rep.deviations)} documented deviations" if rep.deviations else ""
    print(f"{len(rep.rows) - n_fail} passed, {n_fail} failed{devs} ({backend}, "
          f"{engine.name}/{engine.device}/{engine.precision}, {time.perf_counter() - t0:.1f} s)")
    return 0 if rep.passed else 1


if __name__ == "__main__":
    sys.exit(main())
