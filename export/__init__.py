"""Lower an AWQ (or FP16) model to a TVM Relax module with a paged KV cache and write an artifact."""
