"""Demo assets: tiny models, tokenizer and data written in the real on-disk formats."""
