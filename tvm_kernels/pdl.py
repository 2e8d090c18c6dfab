"""Programmatic dependent launch (PDL, sm_90+): let each kernel of a step start while the one before it
finishes, instead of after it.

Why: a decode step is ~300 short dependent kernels. With PDL (captured into CUDA graphs as
programmatic edges since CUDA 12.3) a kernel launched with the programmatic-stream-serialization
attribute may start once every block of its predecessor has executed `griddepcontrol.launch_dependents`;
it then runs `griddepcontrol.wait`, which returns when the predecessor has completed and its writes are
visible. Its launch and block start-up then overlap the predecessor's tail.

How, for every kernel of a module (`apply_pdl`, a pass run after scheduling): the launch parameters get
TVM's `tirx.use_programtic_dependent_launch` tag (the runtime then launches with cuLaunchKernelEx and the
attribute; a tag on the PrimFunc is added to each kernel's computed tags), and each kernel starts with
wait, then launch_dependents: nothing is read or written before the predecessor is done, and at most
one kernel waits behind a running one. PrimFuncs marked `SKIP_ATTR` launch plainly.

Measured on the H100, same exports side by side (benchmarks/results/pdl_ab_h100.json):
- decode: 7B W4 +5% (128 to 2048-token contexts), SmolLM2 +17-20%;
- the prefill GEMMs are skipped: launched early, their blocks (up to ~200 KB of shared memory each) wait
  on SMs and the 7B's time to first token grew by 2.3 ms at 128 and 512 tokens; skipped, it is unchanged;
- the GEMV waits at its start like the rest: starting its weight traffic before the wait (the obvious
  idea, the weights depend on nothing) was slower every way it was tried: its loads hoisted (GEMV ~30%
  slower, 7B decode 1-4% slower; rebuilt with the main loop untouched, 7B x0.92) or an L2 prefetch of its
  block's weights (7B x0.90-0.92).
Targets before sm_90 have no griddepcontrol and get nothing (`DeviceTarget.pdl`).
"""
from __future__ import annotations

from tvm_kernels.targets import DeviceTarget, get_target

LAUNCH_TAG = "tirx.use_programtic_dependent_launch"  # TVM's spelling
SKIP_ATTR = "awq_edge.pdl_skip"  # a PrimFunc whose kernels launch plainly (the prefill GEMMs)

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


def with_pdl(func):
    """`func` (a scheduled PrimFunc) with the launch tag and wait + launch_dependents at the start of each
    of its kernels (the body of each outermost thread-binding loop)."""
    import tvm_ffi
    from tvm import tirx

    def mutate(stmt, mutator):
        if not _is_kernel_loop(stmt):
            return mutator.default_mutate(stmt)
        body = tirx.SeqStmt([tirx.Evaluate(wait()), tirx.Evaluate(launch_dependents()), stmt.body])
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                        stmt.annotations, stmt.step)

    func = func.with_body(tvm_ffi.structural_mutate(func.body, [(tirx.For, mutate)]))
    attrs = func.attrs or {}
    tags = [str(t) for t in (attrs.get("tirx.kernel_launch_params", None) or []) if str(t) != LAUNCH_TAG]
    return func.with_attr("tirx.kernel_launch_params", [*tags, LAUNCH_TAG])


def apply_pdl(target: "str | DeviceTarget"):
    """An IRModule pass: every PrimFunc that launches kernels gets PDL unless it carries `SKIP_ATTR` (see
    the module docstring); a no-op for targets without it. Run it after the TIR is scheduled (the end of
    the relax pipeline), so the KV cache's own kernels are included."""
    import tvm
    from tvm import tirx

    dt = get_target(target)

    @tvm.transform.module_pass(opt_level=0, name="AwqEdgeApplyPDL")
    def _pass(mod, _ctx):
        if not dt.pdl:
            return mod
        out = mod.clone()
        for gv, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc) or bool((func.attrs or {}).get(SKIP_ATTR, False)):
                continue
            if _kernel_loops(func):
                out.update_func(gv, with_pdl(func))
        return out

    return _pass
