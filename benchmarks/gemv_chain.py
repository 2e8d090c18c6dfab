"""The 7B decode layer's o_proj -> add + norm -> gate_up -> down -> add + norm -> next qkv: six kernels (what
export runs today, each with PDL) against one persistent kernel (tvm_kernels/gemv_chain.py). H100.

Both are checked against torch float32 on the same random inputs, then timed cold (three copies of the
layer's weights rotated, CUDA graphs) in alternating rounds.

  .venv/bin/python benchmarks/gemv_chain.py build [--out .gpu/chain]       # here: cubins, no GPU needed
  PYTHONPATH=/tmp/tvmrt:.gpu/tvmrt python3 benchmarks/gemv_chain.py device --lib .gpu/chain/chain.so --out $OUT/chain.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

H, I, Q, G, EPS = 4096, 11008, 12288, 128, 1e-5
# fused variants: name -> gemv_chain keyword arguments
FUSED = {"static_w16_r2424": {"warps": 16, "rows": (2, 4, 2, 4), "dynamic": False}}
TIMED = {"timers_static_w16_r2424": {"warps": 16, "rows": (2, 4, 2, 4), "timers": True, "dynamic": False},
         "timers_dyn_w16_r2424": {"warps": 16, "rows": (2, 4, 2, 4), "timers": True}}


def cmd_build(args) -> int:
    from tvm_kernels.cuda_env import check_cubin, prepare_cuda_build

    prepare_cuda_build()
    import tvm

    from tvm_kernels.fused_ops import add_rms_norm
    from tvm_kernels.gemv_chain import gemv_chain
    from tvm_kernels.gemv_w4a16 import gemv_w4a16
    from tvm_kernels.pdl import with_pdl
    from tvm_kernels.targets import get_target

    t = get_target("cuda-sm90")
    funcs = {"o": gemv_w4a16(H, H, G, t), "gate_up": gemv_w4a16(2 * I, H, G, t, glu="silu"),
             "down": gemv_w4a16(H, I, G, t), "qkv": gemv_w4a16(Q, H, G, t), "norm": add_rms_norm(H, EPS, t)}
    for name, kw in {**FUSED, **TIMED}.items():
        funcs[name] = gemv_chain(H, I, Q, G, EPS, "silu", t, **kw)
    mod = tvm.IRModule({k: with_pdl(f).with_attr("global_symbol", k) for k, f in funcs.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with t.tvm_target() as target:
        lib = tvm.compile(mod, target=target)
    lib.export_library(str(out / "chain.so"))
    check_cubin(out / "chain.so", "sm_90")
    print(out / "chain.so")
    return 0


def cmd_device(args) -> int:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import torch

    import _device_kernels as dk

    mod = dk.tvm_ffi.load_module(args.lib)
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    dev = "cuda"

    def mats():
        return {"o": dk.rand_kernel_tensors(H, H, G, gen), "gate_up": dk.rand_kernel_tensors(2 * I, H, G, gen),
                "down": dk.rand_kernel_tensors(H, I, G, gen), "qkv": dk.rand_kernel_tensors(Q, H, G, gen)}

    sets = [mats() for _ in range(args.copies)]
    gp = (1 + 0.1 * torch.randn(H, device=dev, generator=gen)).half()
    gi = (1 + 0.1 * torch.randn(H, device=dev, generator=gen)).half()
    a = torch.randn(1, H, device=dev, generator=gen).half()
    s = (4 * torch.randn(1, H, device=dev, generator=gen)).half()
    bar = torch.zeros(8, dtype=torch.int32, device=dev)
    f = dk.ffi

    def out_bufs():
        return {"s_mid": torch.empty(1, H, device=dev).half(), "g": torch.empty(1, I, device=dev).half(),
                "s_out": torch.empty(1, H, device=dev).half(), "qkv": torch.empty(1, Q, device=dev).half(),
                "y_o": torch.empty(1, H, device=dev).half(), "n1": torch.empty(1, H, device=dev).half(),
                "y_d": torch.empty(1, H, device=dev).half(), "n2": torch.empty(1, H, device=dev).half()}

    def W(m):
        w, sc, z = m
        return f(dk.as_u32(w)), f(sc), f(z)

    def fused(name, m, o):
        args_ = [f(a), f(s), *W(m["o"]), f(gp), *W(m["gate_up"]), *W(m["down"]), f(gi), *W(m["qkv"]),
                 f(dk.as_u32(bar)), f(o["s_mid"]), f(o["g"]), f(o["s_out"]), f(o["qkv"])]
        fn = mod[name]
        return lambda: fn(*args_)

    def unfused(m, o):
        wo, wgu, wd, wq = W(m["o"]), W(m["gate_up"]), W(m["down"]), W(m["qkv"])
        A, S, GP, GI = f(a), f(s), f(gp), f(gi)
        y_o, n1, s_mid, g, y_d, n2, s_out, qkv = (f(o[k]) for k in ("y_o", "n1", "s_mid", "g", "y_d", "n2", "s_out", "qkv"))
        fo, fn, fgu, fd, fq = (mod[k] for k in ("o", "norm", "gate_up", "down", "qkv"))

        def run():
            fo(A, *wo, y_o)
            fn(y_o, S, GP, n1, s_mid)
            fgu(n1, *wgu, g)
            fd(g, *wd, y_d)
            fn(y_d, s_mid, GI, n2, s_out)
            fq(n2, *wq, qkv)
        return run

    # torch float32 reference of the chain (fp16 where the kernels store fp16)
    def ref(m):
        def lin(x, t3):
            return x.float() @ dk.dequant(*t3, G).T

        def norm(v, gamma):
            v = v.float()
            return (v * torch.rsqrt((v * v).mean(-1, keepdim=True) + EPS) * gamma.float()).half()

        s_mid = (lin(a, m["o"]).half() + s)
        gu = lin(norm(s_mid, gp), m["gate_up"])
        g = (torch.nn.functional.silu(gu[:, 0::2]) * gu[:, 1::2]).half()
        s_out = (lin(g, m["down"]).half() + s_mid)
        return {"s_mid": s_mid, "g": g, "s_out": s_out, "qkv": lin(norm(s_out, gi), m["qkv"]).half()}

    res = {"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "check": {}, "rounds": []}
    r = ref(sets[0])
    for name in ["unfused", *FUSED]:
        o = out_bufs()
        for v in o.values():
            v.fill_(float("nan"))
        (unfused(sets[0], o) if name == "unfused" else fused(name, sets[0], o))()
        torch.cuda.synchronize()
        errs = {k: float((o[k].float() - r[k].float()).norm() / r[k].float().norm()) for k in r}
        res["check"][name] = errs
        print(name, {k: f"{v:.2e}" for k, v in errs.items()}, flush=True)
        if not all(e < 5e-3 for e in errs.values()):
            print(f"{name}: MISMATCH", flush=True)
    O = [out_bufs() for _ in sets]
    launches = {"unfused": [unfused(m, o) for m, o in zip(sets, O)]}
    for name in FUSED:
        launches[name] = [fused(name, m, o) for m, o in zip(sets, O)]
    for rnd in range(args.rounds):
        row = {}
        for name, ls in launches.items():
            t, _ = dk.time_graph(ls, reps_min=60, replays=10)
            row[name] = t * 1e6
        res["rounds"].append(row)
        print(f"round {rnd}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    # where a fused call's time goes: every block's %globaltimer at 12 points (gemv_chain timers), 20 calls
    NB = 132
    for name in TIMED:
        ts = torch.zeros(NB, 13, dtype=torch.int64, device=dev)
        o = O[0]
        fn = mod[name]
        m = sets[0]
        args_ = [f(a), f(s), *W(m["o"]), f(gp), *W(m["gate_up"]), *W(m["down"]), f(gi), *W(m["qkv"]),
                 f(dk.as_u32(bar)), f(o["s_mid"]), f(o["g"]), f(o["s_out"]), f(o["qkv"]), f(ts.view(torch.uint64))]
        labels = ["stage_a", "o", "bar1", "norm1", "gate_up", "bar2", "stage_g", "down", "bar3", "norm2", "qkv"]
        acc_ = {k: [] for k in ["total", *labels]}
        for c in range(20):
            fn(*args_)
            torch.cuda.synchronize()
            t = ts.double().cpu()
            t0 = t[:, 0].min()
            acc_["total"].append(float(t[:, 11].max() - t0) / 1e3)
            for k, lab in enumerate(labels):
                # per interval: the mean over blocks (us) and, for barriers, the wait of the block that waited least
                acc_[lab].append(float((t[:, k + 1] - t[:, k]).mean()) / 1e3)
        res[name] = {k: statistics.median(v) for k, v in acc_.items()}
        res[name + "_last"] = {"start_spread_us": float(t[:, 0].max() - t[:, 0].min()) / 1e3,
                               "phase_end_max_minus_min_us": {lab: float(t[:, k + 1].max() - t[:, k + 1].min()) / 1e3
                                                              for k, lab in enumerate(labels)}}
        print(name, {k: round(v, 2) for k, v in res[name].items()}, flush=True)
        # the last call, per block: (sm, us from the phase's start to the block's end) for each GEMV phase
        per = {}
        for lab, (k0, k1) in {"o": (1, 2), "gate_up": (4, 5), "down": (7, 8), "qkv": (10, 11)}.items():
            per[lab] = sorted((int(t[b, 12]), round(float(t[b, k1] - t[:, k0].min()) / 1e3, 2)) for b in range(NB))
            d = sorted(x for _, x in per[lab])
            print(f"  {lab}: block ends (us) min {d[0]} p10 {d[13]} p50 {d[66]} p90 {d[118]} max {d[-1]}", flush=True)
        res[name + "_per_block"] = per
        print(name, res[name + "_last"], flush=True)
    res["median_us"] = {k: statistics.median(r_[k] for r_ in res["rounds"]) for k in launches}
    for k, v in res["median_us"].items():
        print(f"{k:10s} {v:7.2f} us  (x{res['median_us']['unfused'] / v:.3f} vs unfused)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=str(REPO / ".gpu" / "chain"))
    b.set_defaults(func=cmd_build)
    d = sub.add_parser("device")
    d.add_argument("--lib", default=".gpu/chain/chain.so")
    d.add_argument("--rounds", type=int, default=5)
    d.add_argument("--copies", type=int, default=3)
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_device)
    a = ap.parse_args()
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
