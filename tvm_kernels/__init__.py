"""Hand-scheduled TensorIR W4A16 kernels, one file per kernel with its numpy reference.

Importing this package must not import tvm: the AutoAWQ layout helpers are pure numpy and the
quantizer uses them without the compiler installed.
"""
