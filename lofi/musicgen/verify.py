"""The MusicGen checkers of `python -m lofi_mlx.verify` (lofi.verify picks them when the golden
set's manifest names transformers' Musicgen classes). Everything runs through the MusicGen
engine interface and the shared numpy sampler, so every engine is checked by the same code.

Sampling cannot be reproduced outside torch, so the sampled runs are REPLAYED: at each step our
logits and processed scores are compared with the recorded ones, then the recorded token is
appended; the codes must then match exactly and the audio within the run tolerance.
"""

from __future__ import annotations

import numpy as np

from lofi.musicgen.sampler import (SamplingParams, TokenSampler, apply_delay_pattern,
                                   build_delay_pattern, decode_loop, guide, undelay)


def is_musicgen_manifest(manifest: dict) -> bool:
    classes = manifest.get("reference", {}).get("classes", [])
    return any(str(c).startswith("Musicgen") for c in classes)


class _Model:
    """What the checks need to know about a checkpoint, from its config."""

    def __init__(self, checkpoint):
        from lofi.musicgen.configs import load_config
        self.cfg = load_config(checkpoint)
        d = self.cfg.decoder
        self.k, self.ch, self.pad = d.num_codebooks, d.audio_channels, d.pad_token_id


def _tokenizer(ckpt):
    from lofi.musicgen.text import MusicgenTokenizer
    return MusicgenTokenizer.from_checkpoint(ckpt)


def _cfg_states(engine, ids, mask):
    """Cross-attention inputs of one batched CFG call: cond states then the null (zero) text."""
    _, states = engine.encode_text(ids, mask)
    return (np.concatenate([states, np.zeros_like(states)]),
            np.concatenate([mask, np.zeros_like(mask)]))


def _ckpt(ctx, name):
    return ctx.golden_dir / ("checkpoint_stereo" if name.startswith("stereo") else "checkpoint")


def _engine(ctx, name):
    return ctx.engine_for(_ckpt(ctx, name))


def _decode(engine, codes, channels):
    """codes [B, K, T] -> 32 kHz [B, channels, N]: stereo rows interleaved L0,R0,L1,R1,..."""
    if channels == 1:
        return engine.decode_audio(codes)
    return np.concatenate([engine.decode_audio(codes[:, c::channels]) for c in range(channels)], axis=1)


def check_text_encoder(ctx, name, entry, g, rep):
    tok, e = _tokenizer(ctx.checkpoint), ctx.engine
    prompts = entry["arguments"]["prompts"]
    for case, ps in (("single", prompts[:1]), ("batch", prompts)):
        ids, mask = tok.encode(ps)
        rep.check(f"{name}:{case}.input_ids", ids, g[f"{case}.input_ids"], "exact")
        rep.check(f"{name}:{case}.attention_mask", mask, g[f"{case}.attention_mask"], "exact")
        hidden, states = e.encode_text(g[f"{case}.input_ids"], g[f"{case}.attention_mask"])
        rep.check(f"{name}:{case}.last_hidden_state", hidden, g[f"{case}.last_hidden_state"])
        rep.check(f"{name}:{case}.enc_to_dec_proj_masked", states, g[f"{case}.enc_to_dec_proj_masked"])


def check_decoder(ctx, name, entry, g, rep):
    m, e = _Model(_ckpt(ctx, name)), _engine(ctx, name)
    length = g["delay.out.pattern_mask"].shape[1]
    ids, pat = build_delay_pattern(g["delay.in.input_ids"], m.pad, length, m.k, m.ch)
    rep.check(f"{name}:delay.input_ids", ids, g["delay.out.input_ids"], "exact")
    rep.check(f"{name}:delay.pattern_mask", pat, g["delay.out.pattern_mask"], "exact")
    start = np.full((g["delay.in.input_ids"].shape[0], 1), m.pad, np.int64)
    sids, spat = build_delay_pattern(start, m.pad, length, m.k, m.ch)
    rep.check(f"{name}:delay_start.pattern_mask", spat, g["delay_start.out.pattern_mask"], "exact")
    rep.check(f"{name}:apply", apply_delay_pattern(g["apply.in.input_ids"], spat), g["apply.out"], "exact")
    ids = g["decoder_input_ids"]
    both = np.concatenate([ids, ids])
    enc, mask = g["cross.encoder_hidden_states"], g["cross.attention_mask"]
    logits = e.decoder_session(enc, mask)(both, all_positions=True)
    n = ids.shape[0]
    rep.check(f"{name}:logits.cond", logits[:n], g["logits"][:n])
    rep.check(f"{name}:logits.uncond (all-masked cross-attention)", logits[n:], g["logits"][n:])
    guided = np.stack([guide(logits[:, s], 3.0) for s in range(ids.shape[1])], axis=1)
    rep.check(f"{name}:guided", guided, g["guided"])
    # the whole path from text: our T5 + projection feeding the decoder
    enc2, mask2 = _cfg_states(e, g["text.input_ids"], g["text.attention_mask"])
    rep.check(f"{name}:cross.encoder_hidden_states", enc2, enc)
    logits2 = e.decoder_session(enc2, mask2)(both, all_positions=True)
    rep.check(f"{name}:logits (from text)", logits2, g["logits"])
    # the KV cache: one column at a time gives the full forward's logits
    sess = e.decoder_session(enc, mask)
    steps = np.stack([sess(both[:, s:s + 1]) for s in range(both.shape[1])], axis=1)
    rep.check(f"{name}:logits (KV cache, step by step)", steps, g["logits"])


def _run(ctx, name, g, params, choose):
    m, e = _Model(_ckpt(ctx, name)), _engine(ctx, name)
    enc, mask = _cfg_states(e, g["text.input_ids"], g["text.attention_mask"])
    sess = e.decoder_session(enc, mask)
    frames = g["codes"].shape[-1]
    prefix = np.full((g["text.input_ids"].shape[0] * m.k, 1), m.pad, np.int64)
    seq = decode_loop(sess, prefix, frames, m.k, m.ch, m.pad, params, choose)
    codes = undelay(seq, frames, m.k, m.ch).reshape(-1, m.k, frames)
    return m, e, seq, codes[None]  # [1, B, K, T] as generate() hands them to EnCodec


def _scores_check(rep, label, ours, ref):
    kept = np.isfinite(ref)
    rep.check(f"{label} (kept set)", np.isfinite(ours), kept, "exact")
    rep.check(f"{label} (kept values)", np.where(kept, ours, 0.0), np.where(kept, ref, 0.0))


def check_sample(ctx, name, entry, g, rep):
    args = entry["arguments"]
    params = SamplingParams(float(args.get("guidance_scale", 3.0)), int(args.get("top_k", 250)), 1.0, True)
    raw_l, sc_l = [], []

    def replay(scores, raw, step):
        raw_l.append(raw)
        sc_l.append(scores)
        return g["step.sampled"][step]

    m, e, seq, codes = _run(ctx, name, g, params, replay)
    rep.check(f"{name}:step.raw_logits (every step)", np.stack(raw_l), g["step.raw_logits"])
    _scores_check(rep, f"{name}:step.scores", np.stack(sc_l), g["step.scores"])
    rep.check(f"{name}:sequence.delayed", seq, g["sequence.delayed"], "exact")
    rep.check(f"{name}:codes", codes, g["codes"], "exact")
    rep.check(f"{name}:audio_values (32 kHz)", _decode(e, codes[0], m.ch), g["audio_values"], "run")


def check_greedy(ctx, name, entry, g, rep):
    from lofi.audio import resample
    prompt = entry["arguments"]["prompts"][0]
    ids, mask = _tokenizer(ctx.checkpoint).encode([prompt])
    rep.check(f"{name}:text.input_ids", ids, g["text.input_ids"], "exact")
    hidden, _ = ctx.engine.encode_text(ids, mask)
    rep.check(f"{name}:text.last_hidden_state", hidden, g["text.last_hidden_state"])
    params = SamplingParams(3.0, 0, 1.0, do_sample=False)
    argmax = TokenSampler(0, do_sample=False)
    sc_l = []

    def pick(scores, raw, step):
        sc_l.append(scores)
        return argmax(scores)

    m, e, seq, codes = _run(ctx, name, g, params, pick)
    rep.check(f"{name}:step.scores (guided)", np.stack(sc_l), g["step.scores"])
    rep.check(f"{name}:sequence.delayed (free run)", seq, g["sequence.delayed"], "exact")
    rep.check(f"{name}:codes (free run)", codes, g["codes"], "exact")
    audio = _decode(e, codes[0], m.ch)
    rep.check(f"{name}:audio_values (32 kHz)", audio, g["audio_values"], "run")
    rep.check(f"{name}:audio_values_48k", resample(audio[0], 32000, 48000)[None],
              g["audio_values_48k"], "run")


def check_encodec(ctx, name, entry, g, rep):
    e = ctx.engine
    codes = g["codes"][0]
    rep.check(f"{name}:quantizer.embeddings", e.quantizer_embeddings(codes), g["quantizer.embeddings"])
    rep.check(f"{name}:audio_values", e.decode_audio(codes), g["audio_values"])
    taps = {}
    try:
        audio = e.decode_audio(g["inter.codes"][0], taps=taps)
    except TypeError:  # an engine without intermediate outputs
        audio, taps = e.decode_audio(g["inter.codes"][0]), {}
    for n, t in sorted(taps.items()):
        key = f"inter.decoder.layers.{n}.out"
        if key in g:
            rep.check(f"{name}:{key}", t, g[key])
    rep.check(f"{name}:inter.audio_values", audio, g["inter.audio_values"])


def check_resample(ctx, name, entry, g, rep):
    from lofi.audio import _sinc_kernel, resample
    from lofi.checkpoint import load_safetensors
    h, width = _sinc_kernel(2, 3)
    rep.check(f"{name}:kernel", h[:, None, :], g["kernel"])
    rep.check(f"{name}:tone", resample(g["tone.in"], 32000, 48000), g["tone.out"])
    for b in range(g["encodec.in"].shape[0]):
        rep.check(f"{name}:encodec.{b}", resample(g["encodec.in"][b], 32000, 48000), g["encodec.out"][b])
    if "sample.out" in g and (ctx.golden_dir / "sample.safetensors").is_file():
        src = load_safetensors(ctx.golden_dir / "sample.safetensors")["audio_values"]
        rep.check(f"{name}:sample", resample(src[0], 32000, 48000), g["sample.out"][0])


CHECKERS = [
    ("text_encoder", check_text_encoder), ("stereo_decoder", check_decoder),
    ("stereo_sample", check_sample), ("decoder", check_decoder), ("sample", check_sample),
    ("greedy", check_greedy), ("encodec_decode", check_encodec), ("resample", check_resample),
]
