#!/usr/bin/env bash
# SimPO (LOSS_TYPE=simpo, the default) or CPO (LOSS_TYPE=sigmoid): preference pairs, no reference model, on MODEL
# when set; else on the SFT output (outputs-sft-qwen-v1) when it exists (said on stderr), else on
# Qwen/Qwen2.5-0.5B-Instruct.
# Overrides: MODEL SFT_OUTPUT DATA_DIR OUTPUT_DIR TEMPLATE LOSS_TYPE, and the launcher's (scripts/launch.sh).
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"
source scripts/launch.sh

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
SFT_OUTPUT=${SFT_OUTPUT:-outputs-sft-qwen-v1}
DATA_DIR=${DATA_DIR:-./data/reward}
LOSS_TYPE=${LOSS_TYPE:-simpo}
OUTPUT_DIR=${OUTPUT_DIR:-outputs-$LOSS_TYPE-qwen-v1}
TEMPLATE=${TEMPLATE:-qwen}
# SimPO as published: beta 2, target margin 1, no NLL term. CPO and the others keep trl's beta 0.1 and cpo_alpha 1.
METHOD_ARGS=(--beta 0.1)
if [ "$LOSS_TYPE" = simpo ]; then
    METHOD_ARGS=(--beta 2.0 --simpo_gamma 1.0 --cpo_alpha 0)
fi

launch cpo_training.py \
    --model_name_or_path "$(pick_model "$MODEL_GIVEN" "$SFT_OUTPUT" "$MODEL")" \
    --template_name "$TEMPLATE" \
    --train_file_dir "$DATA_DIR" \
    --validation_file_dir "$DATA_DIR" \
    --loss_type "$LOSS_TYPE" \
    "${METHOD_ARGS[@]}" \
    --per_device_train_batch_size 4 \
    --gradient_accumulation_steps 8 \
    --per_device_eval_batch_size 1 \
    --do_train \
    --do_eval \
    --use_peft True \
    --learning_rate 5e-5 \
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
    --device_map auto \
    --report_to tensorboard \
    --gradient_checkpointing True \
    --cache_dir ./cache
