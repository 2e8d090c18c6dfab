"""Export time and artifact size: SmolLM2-135M AWQ g64 vs FP16, side by side in one run.

    .venv/bin/python benchmarks/export_size.py [--awq CHECKPOINT] [--target cpu]

Without --awq, the W4 checkpoint is a round-to-nearest g64 quantization of the FP16 reference
written in the AutoAWQ GEMM layout (same tensor shapes and sizes as an AWQ one; the values do
not matter for time and size). Writes benchmarks/results/export_size_<target>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rtn_checkpoint(src: Path, dst: Path, group: int = 64) -> Path:
    from safetensors.numpy import save_file

    from export.weights import SafetensorsFolder
    from tvm_kernels.awq_layout import pack_awq

    dst.mkdir(parents=True)
    t = SafetensorsFolder(src)
    out = {}
    for name in t.names():
        w = t.get(name)
        if name.endswith("_proj.weight") and ".layers." in name:
            N, K = w.shape
            g = w.astype(np.float32).reshape(N, K // group, group)
            mx, mn = g.max(-1), g.min(-1)
            s = np.maximum((mx - mn) / 15, 1e-5).astype(np.float16).astype(np.float32)
            z = np.clip(np.round(-mn / s), 0, 15)
            q = np.clip(np.round(g / s[..., None]) + z[..., None], 0, 15).reshape(N, K)
            p = name[: -len(".weight")]
            out[f"{p}.qweight"] = np.ascontiguousarray(pack_awq(q.T.astype(np.uint32)))
            out[f"{p}.qzeros"] = np.ascontiguousarray(pack_awq(z.T.astype(np.uint32)))
            out[f"{p}.scales"] = np.ascontiguousarray(s.T.astype(np.float16))
        else:
            out[name] = w
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
                                  "version": "gemm"}
    (dst / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json") and f.is_file():
            shutil.copy2(f, dst / f.name)
    return dst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--awq", type=Path, help="AWQ GEMM g64 checkpoint of SmolLM2-135M (default: RTN g64 of the reference)")
    ap.add_argument("--target", default="cpu")
    args = ap.parse_args()

    from awq_edge.reference import ensure_reference_fp16
    from export.exporter import export_checkpoint

    fp16 = ensure_reference_fp16()
    work = Path(tempfile.mkdtemp(prefix="export_size_", dir=REPO / ".cache"))
    try:
        awq = args.awq or rtn_checkpoint(fp16, work / "rtn_g64")
        rows = {}
        for name, ckpt in (("fp16", fp16), ("awq_g64", awq)):
            t = time.perf_counter()
            s = export_checkpoint(ckpt, args.target, work / f"art_{name}", force=True)
            s["wall_s"] = round(time.perf_counter() - t, 2)
            files = {p.name: p.stat().st_size for p in (work / f"art_{name}").iterdir() if p.is_file()}
            s["files"] = files
            rows[name] = s
            print(f"{name:8s} export {s['wall_s']:7.1f} s (compile {s['compile_s']:.1f} s, weights {s['weights_s']:.1f} s)  "
                  f"params {s['params_bytes'] / 2**20:7.1f} MiB  library {s['library_bytes'] / 2**20:5.1f} MiB  "
                  f"artifact {s['artifact_bytes'] / 2**20:7.1f} MiB")
        from export.weights import SafetensorsFolder

        t = SafetensorsFolder(fp16)
        emb = t.get("model.embed_tokens.weight").nbytes
        linear = sum(t.get(n).nbytes for n in t.names() if n.endswith("_proj.weight"))
        ratio = rows["awq_g64"]["params_bytes"] / rows["fp16"]["params_bytes"]
        # 4-bit weights = 1/4 of FP16, plus an fp16 scale and zero per 64 weights = 4 B / 128 B = 1/32
        expect = (linear * (1 / 4 + 1 / 32) + (rows["fp16"]["params_bytes"] - linear)) / rows["fp16"]["params_bytes"]
        print(f"params AWQ/FP16 = {ratio:.3f}; expected ~{expect:.3f} (linears at 4 bits + fp16 scales/zeros per 64, "
              f"embeddings {emb / 2**20:.1f} MiB and norms in FP16)")
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        result = {
            "benchmark": "export_size", "command": " ".join([sys.executable, *sys.argv]), "git_commit": commit,
            "device": f"{platform.machine()} build host, {os.cpu_count()} CPU cores",
            # export time is CPU bound; the build host is shared, so say how busy it was
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "target": args.target, "awq_checkpoint": str(args.awq) if args.awq else "RTN g64 of the FP16 reference",
            "rows": rows, "params_ratio_awq_over_fp16": round(ratio, 4), "expected_ratio": round(expect, 4),
            "embedding_bytes": emb, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        out = REPO / "benchmarks" / "results" / f"export_size_{args.target}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
