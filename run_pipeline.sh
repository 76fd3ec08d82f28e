#!/usr/bin/env bash
# The whole chain, each stage taking the previous stage's output:
#   PT -> merge -> SFT -> RM -> PPO,   and   SFT -> DPO -> merge -> batch inference   (ORPO=1 adds ORPO; KTO=1 and
#   SIMPO=1 add KTO and SimPO on the SFT adapter)
# CHAIN=short runs SFT -> DPO -> merge only (the quickstart on a real model, on CPU).
# ANSWERS=questions.jsonl asks the model those questions (greedy, ANSWER_TOKENS new tokens) before training, after
# SFT and at the end; the summary shows the answers side by side.
# It stops at the first failing stage and names it. Every run_*.sh override applies (MODEL, NPROC_PER_NODE, ...);
# EXTRA_ARGS_<STAGE> (PT, SFT, RM, PPO, DPO, ORPO, KTO, SIMPO) add flags to one stage, after EXTRA_ARGS.
#   MODEL=Qwen/Qwen2.5-0.5B sh run_pipeline.sh
#   SUMMARY=1 writes outputs-pipeline-summary.json and a loss-curve PNG per stage (python -m medicalgpt.quickstart.summary).
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

answers() {  # answers NAME MODEL [ADAPTER]: greedy answers to $ANSWERS, for the summary's before/after view
    [ -n "${ANSWERS:-}" ] || return 0
    local adapter=()
    [ -n "${3:-}" ] && adapter=(--lora_model "$3")
    stage "ANSWERS_$1" "$PYTHON" inference.py --base_model "$2" "${adapter[@]}" --template_name "${TEMPLATE:-qwen}" \
        --data_file "$ANSWERS" --output_file "${PREFIX}answers-$1.jsonl" --temperature 0 \
        --max_new_tokens "${ANSWER_TOKENS:-64}"
    answer_files+=("$1=${PREFIX}answers-$1.jsonl")
}

CHAIN=${CHAIN:-full}
case "$CHAIN" in full | short) ;; *) echo "pipeline: CHAIN must be full or short, not '$CHAIN'" >&2; exit 2 ;; esac
export SFT_OUTPUT=${PREFIX}outputs-sft-qwen-v1 RM_OUTPUT=${PREFIX}outputs-rm-qwen-v1 PT_MERGED=${PREFIX}merged-pt-qwen-v1
DPO_OUTPUT=${PREFIX}outputs-dpo-qwen-v1 FINAL=${PREFIX}merged-final-qwen-v1
answer_files=()
runs=()
answers base "$BASE_MODEL"
# Each stage is told its model (MODEL= always wins in run_*.sh): the chain never depends on what a folder holds.
SFT_BASE=$BASE_MODEL
if [ "$CHAIN" = full ]; then
    OUTPUT_DIR=${PREFIX}outputs-pt-qwen-v1 MODEL=$BASE_MODEL run_stage PT run_pt.sh
    merge MERGE_PT "${PREFIX}outputs-pt-qwen-v1" "$PT_MERGED"
    SFT_BASE=$PT_MERGED
    runs+=(PT="${PREFIX}outputs-pt-qwen-v1" MERGE_PT="$PT_MERGED")
fi
OUTPUT_DIR=$SFT_OUTPUT MODEL=$SFT_BASE run_stage SFT run_sft.sh
runs+=(SFT="$SFT_OUTPUT")
answers SFT "$SFT_BASE" "$SFT_OUTPUT"
if [ "$CHAIN" = full ]; then
    OUTPUT_DIR=$RM_OUTPUT MODEL=$SFT_OUTPUT run_stage RM run_rm.sh
    OUTPUT_DIR=${PREFIX}outputs-ppo-qwen-v1 MODEL=$SFT_OUTPUT REWARD_MODEL=$RM_OUTPUT run_stage PPO run_ppo.sh
    runs+=(RM="$RM_OUTPUT" PPO="${PREFIX}outputs-ppo-qwen-v1")
fi
OUTPUT_DIR=$DPO_OUTPUT MODEL=$SFT_OUTPUT run_stage DPO run_dpo.sh
runs+=(DPO="$DPO_OUTPUT")
if [ "${ORPO:-0}" = 1 ]; then
    OUTPUT_DIR=${PREFIX}outputs-orpo-qwen-v1 MODEL=$BASE_MODEL run_stage ORPO run_orpo.sh
    runs+=(ORPO="${PREFIX}outputs-orpo-qwen-v1")
fi
if [ "${KTO:-0}" = 1 ]; then
    OUTPUT_DIR=${PREFIX}outputs-kto-qwen-v1 MODEL=$SFT_OUTPUT run_stage KTO run_kto.sh
    runs+=(KTO="${PREFIX}outputs-kto-qwen-v1")
fi
if [ "${SIMPO:-0}" = 1 ]; then
    OUTPUT_DIR=${PREFIX}outputs-simpo-qwen-v1 MODEL=$SFT_OUTPUT LOSS_TYPE=simpo run_stage SIMPO run_cpo.sh
    runs+=(SIMPO="${PREFIX}outputs-simpo-qwen-v1")
fi
merge MERGE_FINAL "$DPO_OUTPUT" "$FINAL"
runs+=(MERGE_FINAL="$FINAL")
answers DPO "$FINAL"
if [ "$CHAIN" = full ]; then
    stage INFERENCE "$PYTHON" inference.py --base_model "$FINAL" --template_name "${TEMPLATE:-qwen}" \
        --data_file "$INFERENCE_INPUT" --output_file "${PREFIX}outputs-pipeline-predictions.jsonl" --max_new_tokens 32
    runs+=(INFERENCE="${PREFIX}outputs-pipeline-predictions.jsonl")
fi
if [ "${SUMMARY:-0}" = 1 ]; then
    "$PYTHON" -m medicalgpt.quickstart.summary --timings "$TIMINGS" --plots "${PREFIX}outputs-pipeline-plots" \
        --json "${PREFIX}outputs-pipeline-summary.json" "${runs[@]}" ${answer_files[@]:+--answers "${answer_files[@]}"}
fi
echo "pipeline: done. Final model: $FINAL" >&2
