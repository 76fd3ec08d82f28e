#!/usr/bin/env bash
# On-policy distillation: the student MODEL (default Qwen/Qwen2.5-0.5B-Instruct) learns the distributions of TEACHER
# (default Qwen/Qwen2.5-7B-Instruct, loaded in 4-bit: TEACHER_4BIT=False for full precision) on the SFT data.
# Overrides: MODEL TEACHER TEACHER_4BIT DATA_DIR OUTPUT_DIR TEMPLATE, and the launcher's (scripts/launch.sh).
# No gradient checkpointing: with it trl samples the on-policy answers without a KV cache, several times slower.
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch.sh

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
TEACHER=${TEACHER:-Qwen/Qwen2.5-7B-Instruct}
TEACHER_4BIT=${TEACHER_4BIT:-True}
DATA_DIR=${DATA_DIR:-./data/finetune}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-distill-qwen-v1}
TEMPLATE=${TEMPLATE:-qwen}

launch distill_training.py \
    --model_name_or_path "$MODEL" \
    --teacher_model_name_or_path "$TEACHER" \
    --teacher_load_in_4bit "$TEACHER_4BIT" \
    --template_name "$TEMPLATE" \
    --train_file_dir "$DATA_DIR" \
    --validation_file_dir "$DATA_DIR" \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --gradient_accumulation_steps 4 \
    --do_train \
    --do_eval \
    --eval_on_start True \
    --use_peft True \
    --max_train_samples 1000 \
    --max_eval_samples 20 \
    --lmbda 0.5 \
    --beta 0.5 \
    --temperature 0.9 \
    --max_new_tokens 128 \
    --max_length 1024 \
    --max_prompt_length 512 \
    --num_train_epochs 1 \
    --learning_rate 1e-4 \
    --warmup_ratio 0.05 \
    --logging_steps 10 \
    --eval_steps 50 \
    --eval_strategy steps \
    --save_steps 200 \
    --save_strategy steps \
    --save_total_limit 3 \
    --output_dir "$OUTPUT_DIR" \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --torch_dtype bfloat16 \
    --bf16 True \
    --device_map auto \
    --report_to tensorboard \
    --gradient_checkpointing False
