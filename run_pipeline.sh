#!/usr/bin/env bash
# The whole chain, each stage taking the previous stage's output:
#   PT -> merge -> SFT -> RM -> PPO,   and   SFT -> DPO -> merge -> batch inference   (ORPO=1 adds ORPO)
# It stops at the first failing stage and names it. Every run_*.sh override applies (MODEL, NPROC_PER_NODE, ...);
# EXTRA_ARGS_<STAGE> (PT, SFT, RM, PPO, DPO, ORPO) add flags to one stage, after EXTRA_ARGS.
#   MODEL=Qwen/Qwen2.5-0.5B sh run_pipeline.sh
#   SUMMARY=1 writes outputs-pipeline-summary.json and a loss-curve PNG per stage (python -m medicalgpt.summary).
[ -z "${BASH_VERSION:-}" ] && exec bash "$0" "$@"
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}
BASE_MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}
PREFIX=${PREFIX:-}
INFERENCE_INPUT=${INFERENCE_INPUT:-data/inference/input.jsonl}
TIMINGS=${PREFIX}outputs-pipeline-timings.tsv
: > "$TIMINGS"

stage() {
    local name=$1
    shift
    local start=$SECONDS
    echo "=== pipeline: $name ===" >&2
    if ! "$@"; then
        echo "pipeline: stage '$name' failed; stopping here." >&2
        exit 1
    fi
    printf '%s\t%s\n' "$name" "$((SECONDS - start))" >> "$TIMINGS"
}

run_stage() {  # run_stage NAME SCRIPT: a run_*.sh with that stage's EXTRA_ARGS_<NAME> appended
    local name=$1 script=$2 extra_var="EXTRA_ARGS_$1"
    stage "$name" env EXTRA_ARGS="${EXTRA_ARGS:-} ${!extra_var:-}" bash "$script"
}

merge() {  # merge NAME ADAPTER OUTPUT
    stage "$1" "$PYTHON" merge_peft_adapter.py --peft_model_path "$2" --output_dir "$3" --overwrite_output_dir True
}

export SFT_OUTPUT=${PREFIX}outputs-sft-qwen-v1 RM_OUTPUT=${PREFIX}outputs-rm-qwen-v1 PT_MERGED=${PREFIX}merged-pt-qwen-v1
OUTPUT_DIR=${PREFIX}outputs-pt-qwen-v1 run_stage PT run_pt.sh
merge MERGE_PT "${PREFIX}outputs-pt-qwen-v1" "$PT_MERGED"
OUTPUT_DIR=$SFT_OUTPUT run_stage SFT run_sft.sh
OUTPUT_DIR=$RM_OUTPUT run_stage RM run_rm.sh
OUTPUT_DIR=${PREFIX}outputs-ppo-qwen-v1 run_stage PPO run_ppo.sh
OUTPUT_DIR=${PREFIX}outputs-dpo-qwen-v1 run_stage DPO run_dpo.sh
if [ "${ORPO:-0}" = 1 ]; then
    OUTPUT_DIR=${PREFIX}outputs-orpo-qwen-v1 MODEL=$BASE_MODEL run_stage ORPO run_orpo.sh
fi
merge MERGE_FINAL "${PREFIX}outputs-dpo-qwen-v1" "${PREFIX}merged-final-qwen-v1"
stage INFERENCE "$PYTHON" inference.py --base_model "${PREFIX}merged-final-qwen-v1" --template_name "${TEMPLATE:-qwen}" \
    --data_file "$INFERENCE_INPUT" --output_file "${PREFIX}outputs-pipeline-predictions.jsonl" --max_new_tokens 32
if [ "${SUMMARY:-0}" = 1 ]; then
    runs=(PT="${PREFIX}outputs-pt-qwen-v1" MERGE_PT="$PT_MERGED" SFT="$SFT_OUTPUT" RM="$RM_OUTPUT"
        PPO="${PREFIX}outputs-ppo-qwen-v1" DPO="${PREFIX}outputs-dpo-qwen-v1")
    if [ "${ORPO:-0}" = 1 ]; then
        runs+=(ORPO="${PREFIX}outputs-orpo-qwen-v1")
    fi
    runs+=(MERGE_FINAL="${PREFIX}merged-final-qwen-v1" INFERENCE="${PREFIX}outputs-pipeline-predictions.jsonl")
    "$PYTHON" -m medicalgpt.summary --timings "$TIMINGS" --plots "${PREFIX}outputs-pipeline-plots" \
        --json "${PREFIX}outputs-pipeline-summary.json" "${runs[@]}"
fi
echo "pipeline: done. Final model: ${PREFIX}merged-final-qwen-v1; predictions: ${PREFIX}outputs-pipeline-predictions.jsonl" >&2
