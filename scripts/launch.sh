# shellcheck shell=bash
# Sourced by run_*.sh: the launcher settings every stage shares, as environment overrides.
#   NPROC_PER_NODE=2 sh run_sft.sh                               # torchrun on 2 GPUs (or 2 CPU processes)
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 NPROC_PER_NODE=8 sh run_sft.sh    # on each node, its own rank
#   DEEPSPEED=configs/ds_zero3.json NPROC_PER_NODE=8 sh run_sft.sh
#   EXTRA_ARGS="--max_steps 2 --learning_rate 1e-5" sh run_sft.sh        # appended last: they win
# PYTHON: the active environment's python (an activated venv or conda env); else the project's .venv, made by
# `make install` / `make quickstart` (so `sh run_sft.sh` works without `source .venv/bin/activate`); else python.
if [ -z "${PYTHON:-}" ]; then
    if [ -z "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && [ -x .venv/bin/python ]; then
        PYTHON=.venv/bin/python
    else
        PYTHON=python
    fi
fi
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-}
EXTRA_ARGS=${EXTRA_ARGS:-}

# MODEL as the caller set it (empty when not set), before a run_*.sh gives it its default.
MODEL_GIVEN=${MODEL:-}

# pick_model EXPLICIT PREVIOUS DEFAULT [NAME] : the model a stage starts from. An explicit choice (the variable NAME,
# default MODEL) always wins; else PREVIOUS, the previous stage's output, when it exists (said on stderr: a stale
# output is never used unseen); else DEFAULT.
pick_model() {
    local explicit=$1 previous=$2 default=$3 name=${4:-MODEL}
    if [ -n "$explicit" ]; then
        echo "$explicit"
    elif [ -d "$previous" ]; then
        echo "$(basename "$0"): $name is not set: using the previous stage's output $previous" \
            "(set $name=... to choose another model)" >&2
        echo "$previous"
    else
        echo "$default"
    fi
}

# launch SCRIPT ARGS... : python (one process) or torchrun (several), plus --deepspeed and EXTRA_ARGS.
launch() {
    local script=$1
    shift
    local command=("$PYTHON" "$script")
    if [ "$NPROC_PER_NODE" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
        command=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK"
            --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$script")
    fi
    if [ -n "$DEEPSPEED" ]; then
        set -- "$@" --deepspeed "$DEEPSPEED"
    fi
    local extra=()
    read -r -a extra <<< "$EXTRA_ARGS"
    echo "+ ${command[*]} $* ${extra[*]}" >&2
    "${command[@]}" "$@" "${extra[@]}"
}
