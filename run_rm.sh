#!/usr/bin/env bash
# Stage 3: reward model, on MODEL when set; else on the SFT output (outputs-sft-qwen-v1) when it exists (said on
# stderr), else on Qwen/Qwen2.5-0.5B-Instruct.
# Overrides: MODEL SFT_OUTPUT DATA_DIR OUTPUT_DIR TEMPLATE, and the launcher's (scripts/launch.sh).
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch.sh

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
SFT_OUTPUT=${SFT_OUTPUT:-outputs-sft-qwen-v1}
DATA_DIR=${DATA_DIR:-./data/reward}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-rm-qwen-v1}
TEMPLATE=${TEMPLATE:-qwen}

launch reward_modeling.py \
    --model_name_or_path "$(pick_model "$MODEL_GIVEN" "$SFT_OUTPUT" "$MODEL")" \
    --template_name "$TEMPLATE" \
    --train_file_dir "$DATA_DIR" \
    --validation_file_dir "$DATA_DIR" \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 8 \
    --per_device_eval_batch_size 4 \
    --do_train \
    --use_peft True \
    --seed 42 \
    --max_train_samples 1000 \
    --max_eval_samples 10 \
    --num_train_epochs 1 \
    --learning_rate 2e-5 \
    --warmup_ratio 0.05 \
    --weight_decay 0.001 \
    --logging_strategy steps \
    --logging_steps 10 \
    --eval_steps 50 \
    --eval_strategy steps \
    --save_steps 500 \
    --save_strategy steps \
    --save_total_limit 3 \
    --max_source_length 1024 \
    --max_target_length 256 \
    --output_dir "$OUTPUT_DIR" \
    --overwrite_output_dir \
    --ddp_timeout 30000 \
    --logging_first_step True \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --bf16 \
    --torch_dtype bfloat16 \
    --device_map auto \
    --report_to tensorboard \
    --ddp_find_unused_parameters False \
    --remove_unused_columns False \
    --gradient_checkpointing True
