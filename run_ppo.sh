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
# The tutorial's flags are in examples/ppo_full.yaml; the folders and the model, which the overrides set, are given here.

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
SFT_OUTPUT=${SFT_OUTPUT:-outputs-sft-qwen-v1}
RM_OUTPUT=${RM_OUTPUT:-outputs-rm-qwen-v1}
DATA_DIR=${DATA_DIR:-./data/finetune}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-ppo-qwen-v1}
TEMPLATE=${TEMPLATE:-qwen}

launch ppo_training.py examples/ppo_full.yaml \
    --sft_model_path "$(pick_model "$MODEL_GIVEN" "$SFT_OUTPUT" "$MODEL")" \
    --reward_model_path "$(pick_model "${REWARD_MODEL:-}" "$RM_OUTPUT" "$MODEL" REWARD_MODEL)" \
    --template_name "$TEMPLATE" \
    --train_file_dir "$DATA_DIR" \
    --validation_file_dir "$DATA_DIR" \
    --output_dir "$OUTPUT_DIR"
