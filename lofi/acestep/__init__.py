"""The ACE-Step v1 backend: configs, tables, tokenizer, sampler and pipeline. No ML framework."""
