"""Named build targets: the TVM target, how to link for its host, and the numbers schedules read.

Kernels take a `DeviceTarget` and derive their tiling from its fields (SM count, threads, shared
memory, vector width), so one schedule serves every GPU and one serves every CPU.
Importing this module does not import tvm; `DeviceTarget.tvm_target()` does.

CPU choice: `cpu` is x86-64-v3 (AVX2 + FMA + F16C, every x86 desktop/server CPU since ~2013/2015)
rather than `-mcpu=native`: an artifact built on one machine must run on another (CI builds, users
run), and `native` on an AVX-512 build host would emit instructions that crash with SIGILL on most
desktops. `cpu-avx512` (x86-64-v4) is there for servers that have it. `cpu-aarch64` is the Jetson
Orin's own CPU (Cortex-A78AE, NEON + fp16 + dotprod), cross-compiled.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tvm_kernels.errors import UserError


@dataclass(frozen=True)
class DeviceTarget:
    name: str
    kind: str  # "cuda" or "llvm"
    target: dict | str  # TVM target: a config dict or a tag name
    description: str
    host_triple: str = "x86_64-linux-gnu"
    cross_compiler: str | None = None  # passed as export_library(cc=...); None = the host's default
    arch: str | None = None  # "sm_87" for CUDA
    num_sms: int = 0  # CUDA: streaming multiprocessors (how many blocks fill the chip)
    max_threads_per_block: int = 1024
    max_shared_memory_per_block: int = 48 * 1024
    vector_bytes: int = 16  # widest efficient load/SIMD register: 16 B per CUDA thread, 32 AVX2, 64 AVX-512
    num_cores: int = 0  # CPU: threads the parallel loop should expect (0 = whatever the runtime finds)
    dram_gbps: float = 0.0  # nominal memory bandwidth, for projections only
    notes: dict = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def sm(self) -> int:
        """The compute capability as a number (90 for sm_90a); 0 for CPUs."""
        return int("".join(c for c in self.arch if c.isdigit())) if self.is_cuda and self.arch else 0

    @property
    def pdl(self) -> bool:
        """Programmatic dependent launch (griddepcontrol) exists from sm_90 on; see tvm_kernels/pdl.py."""
        return self.sm >= 90

    def tvm_target(self):
        """The tvm.target.Target (imports tvm; for CUDA call cuda_env.prepare_cuda_build() first)."""
        import tvm

        if isinstance(self.target, str):
            return tvm.target.Target(self.target)
        if self.kind == "cuda":
            host = {"kind": "llvm", "mtriple": self.host_triple}
            return tvm.target.Target(dict(self.target), host=host)
        return tvm.target.Target(dict(self.target))

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("notes")
        return d


def _cuda(name, arch, num_sms, desc, *, smem=48 * 1024, dram=0.0, tag=None, host="x86_64-linux-gnu", cc=None, threads=1024):
    target = tag or {
        "kind": "cuda",
        "arch": arch.removesuffix("a"),  # TVM's view; cuda_env compiles the `a` variant (ARCH_SPECIFIC)
        "max_threads_per_block": threads,
        "max_shared_memory_per_block": smem,
        "thread_warp_size": 32,
    }
    return DeviceTarget(
        name=name, kind="cuda", target=target, description=desc, host_triple=host, cross_compiler=cc,
        arch=arch, num_sms=num_sms, max_threads_per_block=threads, max_shared_memory_per_block=smem,
        vector_bytes=16, dram_gbps=dram,
    )


_AARCH64_CC = "aarch64-linux-gnu-g++"

TARGETS: dict[str, DeviceTarget] = {
    t.name: t
    for t in [
        _cuda("jetson-orin", "sm_87", 16, "Jetson AGX Orin 64GB (sm_87, 16 SMs, 204.8 GB/s LPDDR5), aarch64 host",
              tag="nvidia/jetson-agx-orin-64gb", host="aarch64-linux-gnu", cc=_AARCH64_CC, dram=204.8),
        _cuda("jetson-orin-nano", "sm_87", 8, "Jetson Orin Nano (sm_87, 8 SMs, 68/102 GB/s LPDDR5), aarch64 host",
              tag="nvidia/jetson-orin-nano", host="aarch64-linux-gnu", cc=_AARCH64_CC, dram=102.0),
        _cuda("cuda-sm86", "sm_86", 82, "Ampere desktop (RTX 3090: 82 SMs, 936 GB/s)", dram=936.0),
        _cuda("cuda-sm89", "sm_89", 128, "Ada desktop (RTX 4090: 128 SMs, 1008 GB/s)", dram=1008.0),
        # sm_90a, not sm_90: the prefill GEMM uses wgmma, which only the arch-specific target has (every sm_90
        # GPU runs sm_90a cubins; nothing else ran sm_90 ones either). TVM's Target says sm_90, see cuda_env
        _cuda("cuda-sm90", "sm_90a", 132, "Hopper (H100 SXM: 132 SMs, 3350 GB/s HBM3)", dram=3350.0),
        _cuda("cuda-sm120", "sm_120", 170, "Blackwell desktop (RTX 5090: 170 SMs, 1792 GB/s)", dram=1792.0),
        DeviceTarget(
            name="cpu", kind="llvm",
            target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"},
            description="x86-64 CPU, AVX2+FMA (x86-64-v3: portable to any x86 since ~2015)", vector_bytes=32,
        ),
        DeviceTarget(
            name="cpu-avx512", kind="llvm",
            target={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v4"},
            description="x86-64 CPU with AVX-512 (x86-64-v4: Skylake-SP and newer servers, Zen 4)", vector_bytes=64,
        ),
        DeviceTarget(
            name="cpu-aarch64", kind="llvm",
            target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78", "mattr": ["+neon"],
                    "num-cores": 12},
            description="aarch64 NEON CPU (Jetson Orin's Cortex-A78AE), cross-compiled",
            host_triple="aarch64-linux-gnu", cross_compiler=_AARCH64_CC, vector_bytes=16, num_cores=12,
        ),
    ]
}


def get_target(name: "str | DeviceTarget") -> DeviceTarget:
    """A DeviceTarget by name (a DeviceTarget passes through)."""
    if isinstance(name, DeviceTarget):
        return name
    try:
        return TARGETS[name]
    except KeyError:
        raise UserError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}") from None


def list_targets() -> list[DeviceTarget]:
    return list(TARGETS.values())
