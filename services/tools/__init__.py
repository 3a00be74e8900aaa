"""Offline commands and checkpoint builders: `make-tiny-model`, `generate`, `inspect-model`; tiny
random checkpoints with a tokenizer, and FP8 or sized random ones in the official layouts."""
