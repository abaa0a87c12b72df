"""Training: the stdlib Python corpus, the byte-level BPE tokenizer, target training, draft
distillation (DistillSpec) and drafter heads. Entry point: ``specdec train``."""
