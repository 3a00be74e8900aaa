"""Building a model from a checkpoint directory: safetensors headers and byte-range reads
(`checkpoint`), checkpoint names to parameters (`weights`), parallel reads under a memory budget
(`reading`), the loader (`loader`), and sizes per rank from config.json alone (`inspect`)."""
