#!/usr/bin/env bash
# Stage 2: supervised fine-tuning, on MODEL when set; else on the merged PT model (merged-pt-qwen-v1) when it exists
# (said on stderr), else on Qwen/Qwen2.5-0.5B-Instruct.
# Overrides: MODEL DATA_DIR OUTPUT_DIR TEMPLATE PT_MERGED, and the launcher's (scripts/launch.sh).
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch.sh
# The tutorial's flags are in examples/sft_lora.yaml; the folders and the model, which the overrides set, are given here.

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
PT_MERGED=${PT_MERGED:-merged-pt-qwen-v1}
DATA_DIR=${DATA_DIR:-./data/finetune}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-sft-qwen-v1}
TEMPLATE=${TEMPLATE:-qwen}

launch supervised_finetuning.py examples/sft_lora.yaml \
    --model_name_or_path "$(pick_model "$MODEL_GIVEN" "$PT_MERGED" "$MODEL")" \
    --train_file_dir "$DATA_DIR" \
    --validation_file_dir "$DATA_DIR" \
    --template_name "$TEMPLATE" \
    --output_dir "$OUTPUT_DIR"
