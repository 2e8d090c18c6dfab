"""awq-edge: activation-aware weight quantization and the CLI that drives the whole toolchain."""

__version__ = "0.1.0"
