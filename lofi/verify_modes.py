"""Checkers for the audio-input mode goldens (ace_step_tiny_modes), used by lofi.verify.

Every run is replayed through the Engine and lofi.acestep.sampler.modes with the reference's
recorded noise injected in call order. Where lofi deliberately differs from the reference
(extend's left+right pad, extend with left >= right where the reference raises) the reference
run is still replayed with the reference's frame counts (the loop itself must match) and the
group is reported as a DEVIATION line, never as a pass.
"""

from __future__ import annotations

import numpy as np

from lofi.acestep.sampler.noise import InjectedNoise


def _hooked(call: dict) -> bool:
    return any(k.startswith("erg_") and v for k, v in call.items())


def _calls(entry, kind):
    return [c for c in entry.get("calls", []) if c.get("call", "").endswith(kind)]


def _params(p: dict):
    """SamplerParams of a run: its input_params_json, or (a run that raised) its arguments over
    the reference's __call__ defaults, which SamplerParams' defaults are."""
    from lofi.acestep.sampler.loop import SamplerParams
    d = SamplerParams()
    return SamplerParams(
        infer_steps=int(p.get("infer_step", d.infer_steps)),
        guidance_scale=float(p.get("guidance_scale", d.guidance_scale)),
        scheduler_type=p.get("scheduler_type", d.scheduler_type),
        cfg_type=p.get("cfg_type", d.cfg_type), omega_scale=float(p.get("omega_scale", d.omega_scale)),
        guidance_interval=float(p.get("guidance_interval", d.guidance_interval)),
        guidance_interval_decay=float(p.get("guidance_interval_decay", d.guidance_interval_decay)),
        min_guidance_scale=float(p.get("min_guidance_scale", d.min_guidance_scale)),
        use_erg_tag=bool(p.get("use_erg_tag", True)), use_erg_lyric=bool(p.get("use_erg_lyric", True)),
        use_erg_diffusion=bool(p.get("use_erg_diffusion", True)),
        guidance_scale_text=float(p.get("guidance_scale_text", 0.0)),
        guidance_scale_lyric=float(p.get("guidance_scale_lyric", 0.0)))


def _noise_in_call_order(entry, g) -> InjectedNoise:
    arrays = []
    for c in entry.get("calls", []):
        name = c.get("call", "")
        if name == "randn_tensor":
            arrays.append(g[f"randn_tensor.{c['index']}"])
        elif name.endswith("normal_"):
            arrays.append(g[f"normal.{c['index']}"])
    return InjectedNoise(arrays)


def _teacher_forced(ctx, name, entry, g, rep):
    """Every recorded encode/decode/guidance call from its recorded inputs."""
    from lofi.acestep.sampler.guidance import MomentumBuffer, apg
    e = ctx.engine
    for c in _calls(entry, ".encode"):
        p = f"encode.{c['index']}"
        out, mask = e.encode_context(g[f"{p}.in.encoder_text_hidden_states"],
                                     g[f"{p}.in.text_attention_mask"], g[f"{p}.in.lyric_token_idx"],
                                     g[f"{p}.in.lyric_mask"], erg_lyric=_hooked(c))
        rep.check(f"{name}:{p}.encoder_hidden_states", out, g[f"{p}.out.encoder_hidden_states"])
        rep.check(f"{name}:{p}.encoder_hidden_mask", mask, g[f"{p}.out.encoder_hidden_mask"], "exact")
    for c in _calls(entry, ".decode"):
        k, src = c["index"], c.get("encoder_hidden_states_from_encode_call", 0)
        x = g[f"decode.{k}.in.hidden_states"]
        v = e.velocity(x, g[f"decode.{k}.in.timestep"], g[f"encode.{src}.out.encoder_hidden_states"],
                       g[f"encode.{src}.out.encoder_hidden_mask"], np.full(x.shape[0], _hooked(c)))
        rep.check(f"{name}:decode.{k}.sample", v, g[f"decode.{k}.out.sample"])
    last = None  # the previous call that used a momentum buffer (teacher-forced state)
    for c in _calls(entry, "apg_forward"):
        k = c["index"]
        kw = c.get("scalar_kwargs", {})
        buf = None  # momentum_buffer=None in the call: no momentum (FlowEdit's edit target)
        if "momentum_buffer" not in kw:
            buf = MomentumBuffer()
            if c.get("momentum_running_average_before") != 0 and last is not None:
                buf.running_average = g[f"guidance.{last}.momentum_running_average_after"]
            last = k
        out = apg(g[f"guidance.{k}.in.pred_cond"], g[f"guidance.{k}.in.pred_uncond"],
                  float(kw.get("guidance_scale", 15.0)), buf)
        rep.check(f"{name}:guidance.{k}.out", out, g[f"guidance.{k}.out"])
        if buf is not None:
            rep.check(f"{name}:guidance.{k}.momentum", buf.running_average,
                      g[f"guidance.{k}.momentum_running_average_after"])


def _text(ctx, name, g, rep, prefix="text", prompt=None):
    from lofi.acestep.text import PromptTokenizer
    e = ctx.engine
    if prompt is not None:
        ids, mask = PromptTokenizer.from_checkpoint(ctx.checkpoint).encode([prompt])
        rep.check(f"{name}:{prefix}.input_ids", ids, g[f"{prefix}.input_ids"], "exact")
    ids, mask = g[f"{prefix}.input_ids"], g[f"{prefix}.attention_mask"]
    rep.check(f"{name}:{prefix}.last_hidden_state", e.encode_text(ids, mask),
              g[f"{prefix}.last_hidden_state"])
    if f"{prefix}.last_hidden_state_null" in g:
        rep.check(f"{name}:{prefix}.last_hidden_state_null", e.encode_text(ids, mask, erg=True),
                  g[f"{prefix}.last_hidden_state_null"])


def _wave(ctx, name, g, lat, rep):
    if "out.wav_48000" not in g:
        return
    from lofi.audio import resample
    wave = ctx.engine.vocode(ctx.engine.dcae_decode(lat))[0]
    rep.check(f"{name}:out.wav_48000", resample(wave, 44100, 48000), g["out.wav_48000"], "run")


def extend_frames(args: dict, ls: int) -> dict:
    """Left/right frames of an extend run: the reference's (right measured after the left pad,
    may be <= 0) and the intended ones (right measured against the source)."""
    from lofi.acestep.sampler.modes import frame
    a, b = frame(args["repaint_start"]), frame(args["repaint_end"])
    left = max(-a, 0)
    intended = max(b - ls, 0)
    reference = b - (ls + left) if b > ls else 0
    return {"left": left, "right": intended, "reference_right": reference}


def check_mode_run(ctx, name, entry, g, rep):
    from lofi.acestep.sampler.loop import build_conditions, sample
    from lofi.acestep.sampler import modes
    if getattr(ctx.engine, "set_lora", None) is not None:
        ctx.engine.set_lora(None, 1.0)  # no adapter left over from an earlier group
    if entry["arguments"].get("lora_name_or_path"):
        if not _apply_lora(ctx, name, entry, rep):
            return
    args = entry["arguments"]
    p = entry.get("input_params_json") or dict(args)
    task = "audio2audio" if p.get("audio2audio_enable") and p.get("ref_audio_input") \
        else p.get("task", "text2music")
    _text(ctx, name, g, rep, prompt=args["prompt"])
    _teacher_forced(ctx, name, entry, g, rep)
    e, sp = ctx.engine, _params(p)
    if "encode.0.in.lyric_token_idx" in g:
        lyric_ids, lyric_mask = g["encode.0.in.lyric_token_idx"], g["encode.0.in.lyric_mask"]
    elif not args.get("lyrics"):  # a run that raised before encoding: empty lyrics (spec §3.1)
        lyric_ids = lyric_mask = np.zeros((1, 1), np.int64)
    else:
        rep.fail(name, "lyric token ids not recorded")
        return
    # conditions from the recorded text states, through our encoder
    conds = build_conditions(e, g["text.last_hidden_state"], g.get("text.last_hidden_state_null"),
                             g["text.attention_mask"], lyric_ids, lyric_mask, sp)
    noise = _noise_in_call_order(entry, g)
    steps = sorted({int(k.split(".")[1]) for k in g if k.startswith("step.") and k.endswith(".noise")})
    step_noise = InjectedNoise([g[f"step.{i}.noise"] for i in steps])
    lat = None
    if task == "text2music":
        lat = sample(e, conds, noise.randn(g["randn_tensor.0"].shape), sp, step_noise)
    elif task == "retake":
        eps, eps_r = noise.randn(g["randn_tensor.0"].shape), noise.randn(g["randn_tensor.1"].shape)
        x_t = modes.retake_start(eps, eps_r, float(p["retake_variance"]))
        rep.check(f"{name}:retake start x_T", x_t, g["decode.0.in.hidden_states"][:1])
        lat = sample(e, conds, x_t, sp, step_noise)
    elif task == "audio2audio":
        strength = float(p["ref_audio_strength"])
        x = modes.audio2audio_start(g["in.src_latents"], noise.randn(g["randn_tensor.0"].shape),
                                    strength)
        rep.check(f"{name}:audio2audio start", x, g["decode.0.in.hidden_states"][:1])
        lat = sample(e, conds, x, sp, step_noise, sigma_max=1.0 - strength)
    elif task in ("repaint", "extend"):
        lat = _repaint_or_extend(ctx, name, entry, g, rep, task, conds, sp, noise)
        if lat is None:
            return
    else:
        rep.fail(name, f"unknown task {task!r}")
        return
    rep.check(f"{name}:out.latents", lat, g["out.latents"], "run")
    _wave(ctx, name, g, lat, rep)


def _repaint_or_extend(ctx, name, entry, g, rep, task, conds, sp, noise):
    from lofi.acestep.sampler import modes
    p, d = entry.get("input_params_json") or entry["arguments"], entry["derived"]
    src = g["in.src_latents"]
    eps, eps_r = noise.randn(g["randn_tensor.0"].shape), noise.randn(g["randn_tensor.1"].shape)
    var = float(p["retake_variance"])
    if task == "repaint":
        plan = modes.repaint_plan(src, modes.frame(p["repaint_start"]), modes.frame(p["repaint_end"]),
                                  eps, eps_r, var, sp.infer_steps)
    else:
        fr = extend_frames(p, src.shape[-1])
        rep.check(f"{name}:left pad frames", fr["left"], d["left_pad_frame_length"], "exact")
        rep.check(f"{name}:reference right pad frames", fr["reference_right"],
                  d["right_pad_frame_length"], "exact")
        if fr["reference_right"] != fr["right"]:
            ours = modes.extend_plan(src, fr["left"], fr["right"], eps, eps_r, var, sp.infer_steps)
            lat = modes.sample_repaint(ctx.engine, conds, ours, sp)
            finite = bool(np.all(np.isfinite(lat)))
            ref = (f"raises {entry['error']['type']}" if entry.get("error")
                   else f"pads the right by {fr['reference_right']} frames")
            rep.deviation(name, f"lofi extends left {fr['left']} + right {fr['right']} frames "
                          f"(source {src.shape[-1]} -> {lat.shape[-1]} frames, finite={finite}); "
                          f"the reference {ref} (right pad measured after the left pad)")
            if fr["reference_right"] <= 0:  # the reference raised: check what it built first
                rep.check(f"{name}:left noise + source noise (locals.target_latents)",
                          ours.z0[..., :g["locals.target_latents"].shape[-1]],
                          g["locals.target_latents"], "exact")
                return None
        plan = modes.extend_plan(src, fr["left"], fr["reference_right"], eps, eps_r, var,
                                 sp.infer_steps)
    rep.check(f"{name}:locals.x0", plan.x0, g["locals.x0"], "exact")
    rep.check(f"{name}:locals.z0", plan.z0, g["locals.z0"])
    rep.check(f"{name}:locals.repaint_mask", plan.mask, g["locals.repaint_mask"], "exact")
    rep.check(f"{name}:n_min", plan.first_step, d["n_min"], "exact")
    return modes.sample_repaint(ctx.engine, conds, plan, sp)


def check_edit(ctx, name, entry, g, rep):
    from lofi.acestep.sampler import modes
    a, p = entry["arguments"], entry["input_params_json"]
    _text(ctx, name, g, rep, prompt=a["prompt"])
    _text(ctx, name, g, rep, "target_text", prompt=a["edit_target_prompt"])
    _teacher_forced(ctx, name, entry, g, rep)
    e, steps = ctx.engine, int(a["infer_step"])
    # the first forward is the source's when an edit branch runs, else the target's
    encs = [f"encode.{c['index']}.in" for c in _calls(entry, ".encode")]
    edits = int(steps * a["edit_n_max"]) > int(steps * a["edit_n_min"])
    src_k, tgt_k = (encs[0], encs[1]) if edits else (encs[0], encs[0])
    source = modes.edit_conditions(e, g["text.last_hidden_state"], g["text.attention_mask"],
                                   g[f"{src_k}.lyric_token_idx"][:1], g[f"{src_k}.lyric_mask"][:1])
    target = modes.edit_conditions(e, g["target_text.last_hidden_state"],
                                   g["target_text.attention_mask"],
                                   g[f"{tgt_k}.lyric_token_idx"][:1], g[f"{tgt_k}.lyric_mask"][:1])
    for side, cond, k in (("source", source, src_k), ("target", target, tgt_k)):
        ref = g[k.replace(".in", ".out") + ".encoder_hidden_states"]
        rep.check(f"{name}:{side} [cond; uncond] contexts", cond.ctx, ref)
    lat = modes.sample_edit(e, source, target, g["in.src_latents"], steps,
                            float(a["edit_n_min"]), float(a["edit_n_max"]), int(a["edit_n_avg"]),
                            _noise_in_call_order(entry, g), a.get("scheduler_type", "euler"),
                            float(p["guidance_scale"]))
    rep.check(f"{name}:out.latents", lat, g["out.latents"], "run")
    _wave(ctx, name, g, lat, rep)


def check_source_audio(ctx, name, entry, g, rep):
    from lofi.audio import log_mel, prepare_for_encode
    from lofi.acestep.source import read_audio
    audio, sr = read_audio(ctx.golden_dir / "source_audio.wav")
    rep.check(f"{name}:audio (soundfile read)", audio, g["audio"], "exact")
    padded = prepare_for_encode(audio, sr)
    rep.check(f"{name}:encode.resampled_padded_audio", padded, g["encode.resampled_padded_audio"][0])
    # teacher-forced: the log amplifies the resampler's ~1e-7 differences near the mel floor
    rep.check(f"{name}:encode.mel (recorded padded audio)",
              log_mel(g["encode.resampled_padded_audio"][0]), g["encode.mel"][0])
    lat = ctx.engine.dcae_encode(g["encode.mel"])
    rep.check(f"{name}:latents (recorded mel)", lat, g["latents"], "run")
    lat2 = ctx.engine.dcae_encode(log_mel(padded)[None])
    rep.check(f"{name}:latents (wav -> latents)", lat2, g["latents"], "run")


def _apply_lora(ctx, name, entry, rep) -> bool:
    setter = getattr(ctx.engine, "set_lora", None)
    if setter is None:
        rep.fail(name, f"engine {ctx.engine.name} cannot load a LoRA adapter")
        return False
    a = entry["arguments"]
    path = a["lora_name_or_path"].replace("@lora", str(ctx.golden_dir / "lora"))
    setter(path, float(a.get("lora_weight", 1.0)))
    return True


def check_lora_forward(ctx, name, entry, g, rep):
    setter = getattr(ctx.engine, "set_lora", None)
    if setter is None:
        rep.fail(name, f"engine {ctx.engine.name} cannot load a LoRA adapter")
        return
    e = ctx.engine
    x, t = g["in.hidden_states"], g["in.timestep"]
    none = np.zeros(x.shape[0], bool)

    def forward():
        c, cm = e.encode_context(g["in.encoder_text_hidden_states"], g["in.text_attention_mask"],
                                 g["in.lyric_token_idx"], g["in.lyric_mask"])
        return e.velocity(x, t, c, cm, none)

    lora = ctx.golden_dir / entry["arguments"].get("lora_dir", "lora")
    setter(None, 1.0)
    rep.check(f"{name}:no_lora", forward(), g["out.sample.no_lora"])
    for w in ("1.0", "0.5"):
        setter(lora, float(w))
        rep.check(f"{name}:lora_weight_{w}", forward(), g[f"out.sample.lora_weight_{w}"])
    setter(None, 1.0)
    rep.check(f"{name}:after_unload", forward(), g["out.sample.after_unload"])


CHECKERS = [
    ("text2music_", check_mode_run), ("retake_", check_mode_run), ("repaint", check_mode_run),
    ("extend_", check_mode_run), ("audio2audio_", check_mode_run), ("edit_", check_edit),
    ("source_audio", check_source_audio), ("lora_forward", check_lora_forward),
    ("lora_text2music", check_mode_run),
]
