#!/usr/bin/env bash
# ORPO (SFT and alignment at once, no reference model) on MODEL.
# Overrides: MODEL DATA_DIR OUTPUT_DIR TEMPLATE, and the launcher's (scripts/launch.sh).
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch.sh
# The tutorial's flags are in examples/orpo_lora.yaml; the folders and the model, which the overrides set, are given here.

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
DATA_DIR=${DATA_DIR:-./data/reward}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-orpo-qwen-v1}
TEMPLATE=${TEMPLATE:-qwen}

launch orpo_training.py examples/orpo_lora.yaml \
    --model_name_or_path "$MODEL" \
    --template_name "$TEMPLATE" \
    --train_file_dir "$DATA_DIR" \
    --validation_file_dir "$DATA_DIR" \
    --output_dir "$OUTPUT_DIR"
