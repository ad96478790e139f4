"""Text in, token ids out: files and caches, tokenizer and BPE training, packed text windows, SFT rows."""
