#!/usr/bin/env bash
# The main job on the bundled default model (SmolLM2-135M-Instruct), all on CPU:
# FP16 reference -> AWQ INT4 g64 checkpoint -> perplexity FP16 vs AWQ -> cpu export -> generate.
# About 10 minutes on a 2-core machine once .venv exists (AWQ search ~9 min, TVM compile ~15 s).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
CLI=.venv/bin/awq-edge
WINDOWS=${WINDOWS:-8}
mkdir -p artifacts

echo "== FP16 reference (dequantized once from the bundled GGUF)"
FP16=$($PY -c "from awq_edge.reference import ensure_reference_fp16; print(ensure_reference_fp16())")
echo "$FP16"

echo "== AWQ INT4, group 64, 16 x 512 calibration tokens"
$CLI quantize "$FP16" --out artifacts/smollm2-awq-g64 --w-bit 4 --group-size 64 \
  --calib-samples 16 --device cpu --force

echo "== WikiText-2 perplexity, $WINDOWS windows of 512 tokens"
$CLI eval "$FP16" --windows "$WINDOWS" --device cpu --json artifacts/ppl-fp16.json
$CLI eval artifacts/smollm2-awq-g64 --windows "$WINDOWS" --device cpu --json artifacts/ppl-awq-g64.json

echo "== export for this CPU"
$CLI export artifacts/smollm2-awq-g64 --target cpu --out artifacts/smollm2-awq-g64-cpu --force

echo "== generate (TVM runtime only)"
$CLI run artifacts/smollm2-awq-g64-cpu --chat --max-new-tokens 32 --stats \
  --prompt "What is the capital of France?"
