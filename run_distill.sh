#!/usr/bin/env bash
# On-policy distillation: the student MODEL (default Qwen/Qwen2.5-0.5B-Instruct) learns the distributions of TEACHER
# (default Qwen/Qwen2.5-7B-Instruct, loaded in 4-bit: TEACHER_4BIT=False for full precision) on the SFT data.
# Overrides: MODEL TEACHER TEACHER_4BIT DATA_DIR OUTPUT_DIR TEMPLATE, and the launcher's (scripts/launch.sh).
# No gradient checkpointing: with it trl samples the on-policy answers without a KV cache, several times slower.
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch.sh
# The tutorial's flags are in examples/distill_lora.yaml; the folders and the model, which the overrides set, are given here.

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
TEACHER=${TEACHER:-Qwen/Qwen2.5-7B-Instruct}
TEACHER_4BIT=${TEACHER_4BIT:-True}
DATA_DIR=${DATA_DIR:-./data/finetune}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-distill-qwen-v1}
TEMPLATE=${TEMPLATE:-qwen}

launch distill_training.py examples/distill_lora.yaml \
    --model_name_or_path "$MODEL" \
    --teacher_model_name_or_path "$TEACHER" \
    --teacher_load_in_4bit "$TEACHER_4BIT" \
    --template_name "$TEMPLATE" \
    --train_file_dir "$DATA_DIR" \
    --validation_file_dir "$DATA_DIR" \
    --output_dir "$OUTPUT_DIR"
