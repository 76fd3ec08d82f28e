#!/usr/bin/env bash
# Stage 4: PPO. The policy: MODEL when set, else the SFT output (outputs-sft-qwen-v1) when it exists; the reward
# model: REWARD_MODEL when set, else the RM output (outputs-rm-qwen-v1) when it exists; else Qwen2.5-0.5B-Instruct.
# A previous stage's output chosen this way is said on stderr.
# Overrides: MODEL REWARD_MODEL SFT_OUTPUT RM_OUTPUT DATA_DIR OUTPUT_DIR TEMPLATE, and the launcher's
# (scripts/launch.sh).
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch.sh

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
SFT_OUTPUT=${SFT_OUTPUT:-outputs-sft-qwen-v1}
RM_OUTPUT=${RM_OUTPUT:-outputs-rm-qwen-v1}
DATA_DIR=${DATA_DIR:-./data/finetune}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-ppo-qwen-v1}
TEMPLATE=${TEMPLATE:-qwen}

launch ppo_training.py \
    --sft_model_path "$(pick_model "$MODEL_GIVEN" "$SFT_OUTPUT" "$MODEL")" \
    --reward_model_path "$(pick_model "${REWARD_MODEL:-}" "$RM_OUTPUT" "$MODEL" REWARD_MODEL)" \
    --template_name "$TEMPLATE" \
    --torch_dtype bfloat16 \
    --train_file_dir "$DATA_DIR" \
    --validation_file_dir "$DATA_DIR" \
    --max_source_length 1024 \
    --response_length 1000 \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 4 \
    --gradient_checkpointing True \
    --do_train \
    --total_episodes 30000 \
    --output_dir "$OUTPUT_DIR" \
    --missing_eos_penalty 1.0 \
    --eval_strategy steps \
    --eval_steps 100 \
    --num_train_epochs 3 \
    --report_to tensorboard
