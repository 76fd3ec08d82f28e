#!/usr/bin/env bash
# Stage 2: supervised fine-tuning, on MODEL when set; else on the merged PT model (merged-pt-qwen-v1) when it exists
# (said on stderr), else on Qwen/Qwen2.5-0.5B-Instruct.
# Overrides: MODEL DATA_DIR OUTPUT_DIR TEMPLATE PT_MERGED, and the launcher's (scripts/launch.sh).
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch.sh

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
PT_MERGED=${PT_MERGED:-merged-pt-qwen-v1}
DATA_DIR=${DATA_DIR:-./data/finetune}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-sft-qwen-v1}
TEMPLATE=${TEMPLATE:-qwen}

launch supervised_finetuning.py \
    --model_name_or_path "$(pick_model "$MODEL_GIVEN" "$PT_MERGED" "$MODEL")" \
    --train_file_dir "$DATA_DIR" \
    --validation_file_dir "$DATA_DIR" \
    --per_device_train_batch_size 4 \
    --per_device_eval_batch_size 4 \
    --do_train \
    --do_eval \
    --template_name "$TEMPLATE" \
    --use_peft True \
    --max_train_samples 1000 \
    --max_eval_samples 10 \
    --model_max_length 4096 \
    --num_train_epochs 1 \
    --learning_rate 2e-5 \
    --warmup_ratio 0.05 \
    --weight_decay 0.05 \
    --logging_strategy steps \
    --logging_steps 10 \
    --eval_steps 50 \
    --eval_strategy steps \
    --save_steps 500 \
    --save_strategy steps \
    --save_total_limit 13 \
    --gradient_accumulation_steps 8 \
    --preprocessing_num_workers 4 \
    --output_dir "$OUTPUT_DIR" \
    --overwrite_output_dir \
    --ddp_timeout 30000 \
    --logging_first_step True \
    --target_modules all \
    --lora_rank 8 \
    --lora_alpha 16 \
    --lora_dropout 0.05 \
    --torch_dtype bfloat16 \
    --bf16 \
    --device_map auto \
    --report_to tensorboard \
    --ddp_find_unused_parameters False \
    --gradient_checkpointing True \
    --cache_dir ./cache \
    --flash_attn True
