"""Programmatic dependent launch (PDL, sm_90+): let each kernel of a step start while the one before it
finishes, instead of after it.

Why: a decode step is ~300 short kernels in a row. With PDL (captured into CUDA graphs as programmatic
edges since CUDA 12.3) a kernel launched with the programmatic-stream-serialization attribute may start
once every block of its predecessor has executed `griddepcontrol.launch_dependents`; it then runs
`griddepcontrol.wait`, which returns when the predecessor has completed and its writes are visible.
Before that wait a kernel may only read what no earlier kernel writes: the GEMVs load their weights.

Measured on the H100 (benchmarks/results/pdl_ab_h100.json, same exports with and without, alternating
rounds): SmolLM2-135M decode +17-20% (its ~2 us kernels arrive from a host that is the bottleneck, and
PDL takes the GPU-side launch latency off that path), Llama-2-7B-shape -1..-4% and a slower 128-token
prefill (its kernels are long and bandwidth-bound; blocks parked at the wait only occupy SMs). So
`default_on` turns it on for small models only; `export --pdl on|off` overrides.

How, for every kernel of a module (`apply_pdl`, a pass run after scheduling): the launch parameters get
TVM's `tirx.use_programtic_dependent_launch` tag (the runtime then launches with cuLaunchKernelEx and the
attribute; a tag on the PrimFunc is added to each kernel's computed tags), and each kernel starts with
wait, then launch_dependents — in that order, so at most one kernel waits behind a running one.
Kernels that place the two themselves (the GEMV, after its weight loads) carry `MANUAL_ATTR` and only
get the tag. A kernel launched without the attribute, or on a GPU before sm_90, would simply not
overlap: wait returns at once when there is nothing to wait for; but the instructions need sm_90, so
targets before it get nothing (`DeviceTarget.pdl`).
"""
from __future__ import annotations

from tvm_kernels.targets import DeviceTarget, get_target

LAUNCH_TAG = "tirx.use_programtic_dependent_launch"  # TVM's spelling
MANUAL_ATTR = "awq_edge.pdl_in_kernel"  # the kernel places wait / launch_dependents itself

_WAIT_SOURCE = r"""
__device__ __forceinline__ void awq_pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
"""
_LAUNCH_SOURCE = r"""
__device__ __forceinline__ void awq_pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;"); }
"""


def wait():
    """The TIR call: block until the preceding kernel has completed and its writes are visible."""
    from tvm.backend.cuda.op import cuda_func_call

    return cuda_func_call("awq_pdl_wait", source_code=_WAIT_SOURCE, return_type="void")


def launch_dependents():
    """The TIR call: this block no longer holds back the next kernel's launch."""
    from tvm.backend.cuda.op import cuda_func_call

    return cuda_func_call("awq_pdl_launch_dependents", source_code=_LAUNCH_SOURCE, return_type="void")


def _is_kernel_loop(stmt) -> bool:
    from tvm import tirx

    return isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.THREAD_BINDING


def _kernel_loops(func) -> list:
    """The outermost thread-binding loops of a scheduled PrimFunc: one per kernel it launches."""
    import tvm_ffi
    from tvm import tirx

    found = []

    def visit(stmt, visitor):
        if _is_kernel_loop(stmt):
            found.append(stmt)  # inner thread loops belong to the same kernel: no descent
        else:
            visitor.default_visit(stmt)

    tvm_ffi.structural_visit(func.body, [(tirx.For, visit)])
    return found


def with_pdl(func, manual: bool = False):
    """`func` (a scheduled PrimFunc) with the launch tag and, unless `manual`, wait + launch_dependents at
    the start of each of its kernels (the body of each outermost thread-binding loop)."""
    import tvm_ffi
    from tvm import tirx

    if not manual:
        def mutate(stmt, mutator):
            if not _is_kernel_loop(stmt):
                return mutator.default_mutate(stmt)
            body = tirx.SeqStmt([tirx.Evaluate(wait()), tirx.Evaluate(launch_dependents()), stmt.body])
            return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                            stmt.annotations, stmt.step)

        func = func.with_body(tvm_ffi.structural_mutate(func.body, [(tirx.For, mutate)]))
    tags = [str(t) for t in (func.attrs.get("tirx.kernel_launch_params", None) or []) if str(t) != LAUNCH_TAG]
    return func.with_attr("tirx.kernel_launch_params", [*tags, LAUNCH_TAG])


# Largest hidden size that gets PDL by default. Measured at both ends only (576: faster, 4096: slower);
# the boundary between them is a judgement, not a measurement.
AUTO_MAX_HIDDEN = 2048


def default_on(target: "str | DeviceTarget", hidden_size: int) -> bool:
    """Whether an export for `target` launches with PDL unless told otherwise (see the module docstring)."""
    return get_target(target).pdl and hidden_size <= AUTO_MAX_HIDDEN


def apply_pdl(target: "str | DeviceTarget"):
    """An IRModule pass: every PrimFunc that launches kernels gets PDL (see the module docstring); a
    no-op for targets without it. Run it after the TIR is scheduled (the end of the relax pipeline)."""
    import tvm
    from tvm import tirx

    dt = get_target(target)

    @tvm.transform.module_pass(opt_level=0, name="AwqEdgeApplyPDL")
    def _pass(mod, _ctx):
        if not dt.pdl:
            return mod
        out = mod.clone()
        for gv, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and _kernel_loops(func):
                out.update_func(gv, with_pdl(func, manual=bool(func.attrs and func.attrs.get(MANUAL_ATTR, False))))
        return out

    return _pass
