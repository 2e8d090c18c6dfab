"""Hopper wgmma prefill GEMM (tvm_kernels/gemm_w4a16_sm90.py): build here, check and time on the GPU machine.

  python benchmarks/gemm_sm90.py build [--out .gpu/gemm_sm90]      # one sm_90a library + plan (the carry folder)
  # on the GPU machine (run tool, carry .gpu/tvmrt and .gpu/gemm_sm90):
  #   python3 -m pip install -q --no-index --no-deps --target /tmp/tvmrt .gpu/tvmrt/*.whl &&
  #   PYTHONPATH=/tmp/tvmrt:.gpu/tvmrt python3 benchmarks/_device_gemm_sm90.py .gpu/gemm_sm90 $OUT
  python benchmarks/gemm_sm90.py collect DEVICE_JSON [DEVICE_JSON ...] --name gemm_sm90_h100.json

In one device run, for the Llama-2-7B prefill shapes (g128) and SmolLM2's (g64) at M = 128 to 2048: the
kernel export uses (`dispatch`: the tilings of default_tilings, TINY / SMALL / LARGE picked by M), each 7B
tiling alone (SmolLM2: SMALL alone), SMALL and LARGE with the dequantize taken out (`*raw`, wrong results:
the main loop's own ceiling), the portable mma.sync kernel (gemm_w4a16.py with its own tiling), and cuBLAS FP16 (torch.matmul with
the dequantized weights). Every kernel that computes real results is first checked against a float32 torch
reference at M = 1, 77 and 2048 (output poisoned with NaN first).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.kernels import RESULTS, git_commit  # noqa: E402

LLAMA7B = [("qkv", 12288, 4096, 128), ("o", 4096, 4096, 128), ("gate_up", 22016, 4096, 128), ("down", 4096, 11008, 128)]
SMOLLM2 = [("smol_qkv", 960, 576, 64), ("smol_gate_up", 3072, 576, 64), ("smol_down", 576, 1536, 64)]


def cmd_build(args) -> int:
    from tvm_kernels.cuda_env import check_cubin, prepare_cuda_build

    prepare_cuda_build()
    import tvm

    from tvm_kernels import gemm_w4a16_sm90 as sm90
    from tvm_kernels.gemm_w4a16 import BUILD_CONFIG, cuda_config, gemm_w4a16
    from tvm_kernels.targets import get_target

    t = get_target("cuda-sm90")
    raw = {"small": sm90.SMALL, "large": sm90.LARGE}  # also timed without the dequantize
    alone = {**raw, "tiny": sm90.TINY}
    plan = {"commit": git_commit(), "built": datetime.datetime.utcnow().isoformat() + "Z",
            "command": " ".join([sys.executable] + sys.argv), "arch": t.arch, "kernels": [],
            "configs": {k: vars(v) for k, v in alone.items()}}
    funcs = {}

    def add(name, f, label, N, K, G, kind, check=True):
        funcs[name] = f.with_attr("global_symbol", name)
        plan["kernels"].append({"name": name, "label": label, "N": N, "K": K, "G": G, "kind": kind, "check": check})

    for label, N, K, G in LLAMA7B + SMOLLM2:
        add(f"{label}_dispatch", gemm_w4a16(N, K, G, t), label, N, K, G, "dispatch")
        plan["kernels"][-1]["tilings"] = [[m, vars(c)] for m, c in sm90.default_tilings(N, t.num_sms)]
        add(f"{label}_portable", gemm_w4a16(N, K, G, t, config=cuda_config(N, K, t)), label, N, K, G, "portable")
        if (label, N, K, G) in LLAMA7B:
            for name, cfg in alone.items():
                add(f"{label}_{name}", sm90.gemm_w4a16_sm90(N, K, G, [(0, cfg)]), label, N, K, G, name)
                if name not in raw:
                    continue
                nodeq = dataclasses.replace(cfg, dequant=False)
                add(f"{label}_{name}raw", sm90.gemm_w4a16_sm90(N, K, G, [(0, nodeq)]), label, N, K, G,
                    f"{name}raw", check=False)
        else:  # SmolLM2's narrow layers: the export's pick against the 128 x 128 tiles alone
            add(f"{label}_small", sm90.gemm_w4a16_sm90(N, K, G, [(0, sm90.SMALL)]), label, N, K, G, "small")
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    with tvm.transform.PassContext(config=BUILD_CONFIG), t.tvm_target() as target:
        lib = tvm.compile(tvm.IRModule(funcs), target=target)
    lib.export_library(str(tmp / "gemm.so"))
    plan["fatbin"] = check_cubin(tmp / "gemm.so", t.arch)
    plan["build_s"] = round(time.time() - t0, 1)
    (tmp / "plan.json").write_text(json.dumps(plan, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"built {len(funcs)} kernels for {t.arch} in {plan['build_s']} s -> {out} {plan['fatbin']}")
    return 0


def cmd_collect(args) -> int:
    runs = [json.loads(Path(f).read_text()) for f in args.device_json]
    # one run as it is; several (the history of a kernel across versions) side by side in one file
    data = runs[0] if len(runs) == 1 else {"runs": [{"file": f, **r} for f, r in zip(args.device_json, runs)]}
    data["collected"] = {"command": " ".join([sys.executable] + sys.argv), "commit_at_collect": git_commit(),
                         "notes": args.note}
    out = RESULTS / args.name
    out.write_text(json.dumps(data, indent=1))
    print(f"wrote {out}")
    for line in data.get("summary_lines", []):
        print(line)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=str(REPO / ".gpu" / "gemm_sm90"))
    c = sub.add_parser("collect")
    c.add_argument("device_json", nargs="+")
    c.add_argument("--name", default="gemm_sm90_h100.json")
    c.add_argument("--note", action="append", default=[])
    args = ap.parse_args()
    return {"build": cmd_build, "collect": cmd_collect}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
