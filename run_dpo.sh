#!/usr/bin/env bash
# DPO on MODEL when set; else on the SFT output (outputs-sft-qwen-v1) when it exists (said on stderr), else on
# Qwen/Qwen2.5-0.5B-Instruct.
# Overrides: MODEL SFT_OUTPUT DATA_DIR OUTPUT_DIR TEMPLATE, and the launcher's (scripts/launch.sh).
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch.sh
# The tutorial's flags are in examples/dpo_lora.yaml; the folders and the model, which the overrides set, are given here.

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
SFT_OUTPUT=${SFT_OUTPUT:-outputs-sft-qwen-v1}
DATA_DIR=${DATA_DIR:-./data/reward}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-dpo-qwen-v1}
TEMPLATE=${TEMPLATE:-qwen}

launch dpo_training.py examples/dpo_lora.yaml \
    --model_name_or_path "$(pick_model "$MODEL_GIVEN" "$SFT_OUTPUT" "$MODEL")" \
    --template_name "$TEMPLATE" \
    --train_file_dir "$DATA_DIR" \
    --validation_file_dir "$DATA_DIR" \
    --output_dir "$OUTPUT_DIR"
