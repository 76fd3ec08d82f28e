#!/usr/bin/env bash
# KTO (answers judged one at a time, thumbs up / down) on MODEL when set; else on the SFT output
# (outputs-sft-qwen-v1) when it exists (said on stderr), else on Qwen/Qwen2.5-0.5B-Instruct.
# Overrides: MODEL SFT_OUTPUT DATA_DIR OUTPUT_DIR TEMPLATE, and the launcher's (scripts/launch.sh).
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch.sh

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
SFT_OUTPUT=${SFT_OUTPUT:-outputs-sft-qwen-v1}
DATA_DIR=${DATA_DIR:-./data/kto}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-kto-qwen-v1}
TEMPLATE=${TEMPLATE:-qwen}

launch kto_training.py \
    --model_name_or_path "$(pick_model "$MODEL_GIVEN" "$SFT_OUTPUT" "$MODEL")" \
    --template_name "$TEMPLATE" \
    --train_file_dir "$DATA_DIR" \
    --validation_file_dir "$DATA_DIR" \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 8 \
    --per_device_eval_batch_size 4 \
    --do_train \
    --do_eval \
    --use_peft True \
    --learning_rate 5e-5 \
    --beta 0.1 \
    --desirable_weight 1.0 \
    --undesirable_weight 1.0 \
    --max_train_samples 1000 \
    --max_eval_samples 10 \
    --max_steps 100 \
    --eval_steps 20 \
    --save_steps 50 \
    --max_source_length 1024 \
    --max_target_length 512 \
    --output_dir "$OUTPUT_DIR" \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --torch_dtype bfloat16 \
    --bf16 True \
    --fp16 False \
    --device_map auto \
    --report_to tensorboard \
    --gradient_checkpointing True \
    --cache_dir ./cache
