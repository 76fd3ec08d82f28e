#!/usr/bin/env bash
# Stage 1: continued pretraining. Overrides: MODEL DATA_DIR OUTPUT_DIR, and the launcher's (scripts/launch.sh).
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch.sh
# The tutorial's flags are in examples/pt_lora.yaml; the folders and the model, which the overrides set, are given here.

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B}
DATA_DIR=${DATA_DIR:-./data/pretrain}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-pt-qwen-v1}

launch pretraining.py examples/pt_lora.yaml \
    --model_name_or_path "$MODEL" \
    --train_file_dir "$DATA_DIR" \
    --validation_file_dir "$DATA_DIR" \
    --output_dir "$OUTPUT_DIR"
