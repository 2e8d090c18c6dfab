"""The device argmax (greedy token) against its numpy reference (llvm in CI), and the CUDA builds."""
import numpy as np
import pytest

from tests.cuda_build import build_and_check_cubin
from tvm_kernels.argmax import argmax, reference, threads
from tvm_kernels.errors import UserError
from tvm_kernels.targets import get_target

tvm = pytest.importorskip("tvm")


def _cases(V, rng):
    """Random rows, ties (the lowest index must win), all -inf, NaNs among the values."""
    x = rng.standard_normal(V).astype(np.float32)
    yield x
    t = x.copy()
    t[[V // 3, V - 1, min(2, V - 1)]] = 9.0
    yield t
    yield np.full(V, -np.inf, np.float32)
    n = x.copy()
    n[0] = np.nan
    n[V // 2] = 50.0
    yield n


@pytest.mark.parametrize("V", [1, 7, 1000, 49152, 32001])
def test_cpu_argmax_matches_reference(V):
    lib = tvm.compile(tvm.IRModule({"main": argmax(V, "cpu").with_attr("global_symbol", "main")}),
                      target=get_target("cpu").tvm_target())
    for x in _cases(V, np.random.default_rng(V)):
        out = tvm.runtime.tensor(np.array([-1], np.int32))
        lib["main"](tvm.runtime.tensor(x.reshape(1, 1, V)), out)
        assert int(out.numpy()[0]) == reference(x)


def test_reference_is_numpy_argmax_lowest_index():
    x = np.array([1.0, 3.0, np.nan, 3.0, -np.inf], np.float32)
    assert reference(x) == 1
    assert reference(np.full(4, -np.inf, np.float32)) == 0


@pytest.mark.parametrize("V,expected", [(1, 32), (40, 64), (49152, 1024), (262144, 1024)])
def test_threads_are_whole_warps(V, expected):
    assert threads(V, 1024) == expected


def test_bad_vocab_is_one_line_error():
    with pytest.raises(UserError, match="vocabulary size"):
        argmax(0, "cpu")


@pytest.mark.parametrize("target,arch", [("cuda-sm90", "sm_90"), ("jetson-orin", "sm_87")])
def test_cuda_argmax_builds(tmp_path, target, arch):
    build_and_check_cubin(tmp_path, target, arch, """
        from tvm_kernels.argmax import argmax
        funcs = {"argmax_49152": argmax(49152, t), "argmax_100": argmax(100, t)}
    """)


def test_packed_key_orders_like_value_then_lowest_index():
    # the CUDA kernel reduces (value, index) pairs as one uint64 key: evaluate that expression on the CPU
    from tvm import te

    from tvm_kernels.argmax import _key

    vals = np.array([0.0, -0.0, 1.5, -1.5, np.inf, -np.inf, 3.0e38, -3.0e38, 1e-40, -1e-40, 1.5, 0.0], np.float32)
    n = len(vals)
    v = te.placeholder((n,), "float32", name="v")
    k = te.compute((n,), lambda i: _key(v[i], i.astype("int32")), name="k")
    lib = tvm.compile(te.create_prim_func([v, k]), target=get_target("cpu").tvm_target())
    out = tvm.runtime.tensor(np.zeros(n, np.uint64))
    lib(tvm.runtime.tensor(vals), out)
    keys = out.numpy()
    for i in range(n):
        for j in range(n):
            pair_wins = vals[i] > vals[j] or (vals[i] == vals[j] and i < j)
            assert (keys[i] > keys[j]) == pair_wins, (vals[i], i, vals[j], j)
