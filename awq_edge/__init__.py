"""awq-edge: activation-aware weight quantization and the CLI that drives the whole toolchain."""

__version__ = "0.1.0"

__all__ = ["load_awq_model"]


def __getattr__(name):
    # Lazy: `import awq_edge` (the CLI, the runtime's users) must not pull in torch/transformers.
    if name == "load_awq_model":
        from awq_edge.checkpoint import load_awq_model

        return load_awq_model
    raise AttributeError(f"module 'awq_edge' has no attribute {name!r}")
