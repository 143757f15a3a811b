"""MusicGen (Hugging Face transformers' MusicgenForConditionalGeneration), engine-agnostic parts:
configs, tokenizer, delay pattern, the CFG sampling loop, windowed continuation and the pipeline."""
