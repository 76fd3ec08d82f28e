#!/usr/bin/env bash
# KTO (answers judged one at a time, thumbs up / down) on MODEL when set; else on the SFT output
# (outputs-sft-qwen-v1) when it exists (said on stderr), else on Qwen/Qwen2.5-0.5B-Instruct.
# Overrides: MODEL SFT_OUTPUT DATA_DIR OUTPUT_DIR TEMPLATE, and the launcher's (scripts/launch.sh).
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch.sh
# The tutorial's flags are in examples/kto_lora.yaml; the model, data and output folders (the overrides) are given here.

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
SFT_OUTPUT=${SFT_OUTPUT:-outputs-sft-qwen-v1}
DATA_DIR=${DATA_DIR:-./data/kto}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-kto-qwen-v1}
TEMPLATE=${TEMPLATE:-qwen}

launch kto_training.py examples/kto_lora.yaml \
    --model_name_or_path "$(pick_model "$MODEL_GIVEN" "$SFT_OUTPUT" "$MODEL")" \
    --template_name "$TEMPLATE" \
    --train_file_dir "$DATA_DIR" \
    --validation_file_dir "$DATA_DIR" \
    --output_dir "$OUTPUT_DIR"
