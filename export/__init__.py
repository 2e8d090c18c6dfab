"""Lower an AWQ (or FP16) model to a TVM Relax module with a paged KV cache and write an artifact.

    awq-edge export CHECKPOINT --target cuda-sm90 --out DIR     # CLI (export/cli.py)

    from export.exporter import export_checkpoint, export_config, synthesize_params
    export_checkpoint(folder, "jetson-orin", out)                # AWQ GEMM or FP16 HF folder
    export_config(hf_config_dict, "cuda-sm90", out, group_size=128)  # no weights: params listed in
                                                                      # the manifest with "file": null
Modules: model.py (the nn.Module and per-family data), kernels.py (how a W4 linear becomes TIR),
cpu_schedule.py (the llvm pipeline), weights.py (checkpoint reading), exporter.py (build + artifact).
"""
