"""Model definitions, KV cache, sampling, the generation loop, tokenizer and chat template."""
