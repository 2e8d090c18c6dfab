"""On-device runtime: needs only the TVM runtime, numpy, tokenizers and jinja2."""
