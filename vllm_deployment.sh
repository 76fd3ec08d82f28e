#!/bin/sh
# Serve a model with vLLM's OpenAI-compatible server (GPU), wait until it is healthy, send one sample request,
# then keep serving until Ctrl-C.
#
#   sh vllm_deployment.sh                                        # serves ./merged-sft-qwen-v1 on 127.0.0.1:8000
#   MODEL=merged-sft-qwen-v1 PORT=8000 TENSOR_PARALLEL_SIZE=2 sh vllm_deployment.sh
#   BASE_MODEL=Qwen/Qwen2.5-0.5B-Instruct LORA_MODEL=outputs-sft-qwen-v1 sh vllm_deployment.sh   # base + LoRA
#   sh vllm_deployment.sh --dry-run                              # print the commands, run nothing (or DRY_RUN=1)
#
# Settings (environment variables, default in brackets):
#   MODEL [merged-sft-qwen-v1]   a merged model (merge_peft_adapter.py writes its chat template and stop tokens)
#   BASE_MODEL, LORA_MODEL       instead of MODEL: a base model and a LoRA adapter, served with --enable-lora
#   SERVED_MODEL_NAME [medicalgpt]  the model id clients ask for (the adapter is SERVED_MODEL_NAME-lora)
#   HOST [127.0.0.1]  PORT [8000]  TENSOR_PARALLEL_SIZE [1]  MAX_MODEL_LEN [the model's]
#   VLLM_API_KEY                 when set, vLLM requires `Authorization: Bearer $VLLM_API_KEY`
#   TOOL_CALL_PARSER             when set (hermes: the <tool_call> format of Qwen2.5/Qwen3 and of our templates),
#                                requests may carry OpenAI `tools`, answered with `tool_calls`
#   PYTHON [python: the active environment's; vLLM needs a CUDA GPU and `pip install vllm`]
#   HEALTH_TIMEOUT [900 s to load the model]
#
# The same API from Python, with the official client (pip install openai):
#   from openai import OpenAI
#   client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=os.environ.get("VLLM_API_KEY", "EMPTY"))
#   reply = client.chat.completions.create(model="medicalgpt",
#                                          messages=[{"role": "user", "content": "小孩发烧怎么办？"}])
#   print(reply.choices[0].message.content)
#   for chunk in client.chat.completions.create(model="medicalgpt", messages=[...], stream=True): ...
# fastapi_server_demo.py serves the same API on CPU or GPU without vLLM.
set -eu

MODEL="${MODEL:-merged-sft-qwen-v1}"
BASE_MODEL="${BASE_MODEL:-}"
LORA_MODEL="${LORA_MODEL:-}"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-medicalgpt}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
TENSOR_PARALLEL_SIZE="${TENSOR_PARALLEL_SIZE:-1}"
MAX_MODEL_LEN="${MAX_MODEL_LEN:-}"
TOOL_CALL_PARSER="${TOOL_CALL_PARSER:-}"
PYTHON="${PYTHON:-python}"
HEALTH_TIMEOUT="${HEALTH_TIMEOUT:-900}"
DRY_RUN="${DRY_RUN:-0}"

for arg in "$@"; do
    case "$arg" in
        --dry-run | --dry_run) DRY_RUN=1 ;;
        -h | --help)
            sed -n '2,/^set -eu/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "vllm_deployment.sh: unknown argument $arg (settings are environment variables; see --help)" >&2
            exit 2
            ;;
    esac
done

# Print a command with each word quoted for the shell where needed.
print_command() {
    line=""
    for word in "$@"; do
        case "$word" in
            "" | *[!A-Za-z0-9_./:=,@+-]*) word="'$(printf '%s' "$word" | sed "s/'/'\\\\''/g")'" ;;
        esac
        line="$line $word"
    done
    printf '%s\n' "${line# }"
}

if [ -n "$LORA_MODEL" ]; then
    if [ -z "$BASE_MODEL" ]; then
        echo "vllm_deployment.sh: LORA_MODEL needs BASE_MODEL (the model the adapter was trained on)" >&2
        exit 2
    fi
    REQUEST_MODEL="$SERVED_MODEL_NAME-lora"
    set -- -m vllm.entrypoints.openai.api_server --model "$BASE_MODEL" --served-model-name "$SERVED_MODEL_NAME" \
        --enable-lora --lora-modules "$REQUEST_MODEL=$LORA_MODEL"
else
    REQUEST_MODEL="$SERVED_MODEL_NAME"
    set -- -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name "$SERVED_MODEL_NAME"
fi
set -- "$@" --host "$HOST" --port "$PORT" --tensor-parallel-size "$TENSOR_PARALLEL_SIZE"
if [ -n "$MAX_MODEL_LEN" ]; then
    set -- "$@" --max-model-len "$MAX_MODEL_LEN"
fi
if [ -n "$TOOL_CALL_PARSER" ]; then
    set -- "$@" --enable-auto-tool-choice --tool-call-parser "$TOOL_CALL_PARSER"
fi

URL="http://$HOST:$PORT"
BODY=$(printf '{"model": "%s", "messages": [{"role": "user", "content": "%s"}], "max_tokens": 256}' \
    "$REQUEST_MODEL" "小孩发烧怎么办？")

if [ "$DRY_RUN" = 1 ]; then
    print_command "$PYTHON" "$@"
    echo "# then, once $URL/health answers 200:"
    # The key stays a variable the reader's shell expands: double quotes, printed as they are.
    # shellcheck disable=SC2016
    printf '%s -H "Authorization: Bearer ${VLLM_API_KEY:-EMPTY}" %s\n' \
        "$(print_command curl -sS "$URL/v1/chat/completions" -H "Content-Type: application/json")" \
        "$(print_command -d "$BODY")"
    exit 0
fi

if ! command -v curl >/dev/null 2>&1; then
    echo "vllm_deployment.sh: curl is needed for the health check and the sample request" >&2
    exit 1
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "vllm_deployment.sh: no '$PYTHON' here: activate the environment that has vLLM, or set PYTHON=" >&2
    exit 1
fi
print_command "$PYTHON" "$@"
"$PYTHON" "$@" &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true' INT TERM EXIT

echo "Waiting for $URL/health (loading the model can take minutes) ..."
waited=0
until curl -fsS -o /dev/null "$URL/health" 2>/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
        if ! "$PYTHON" -c "import vllm" >/dev/null 2>&1; then
            echo "vllm_deployment.sh: vLLM is not installed for $PYTHON: pip install vllm (on a CUDA GPU machine;" \
                "it pins its own torch and transformers, so a separate virtual environment is best: then" \
                "PYTHON=/that/venv/bin/python). fastapi_server_demo.py serves the same API without vLLM." >&2
        else
            echo "vllm_deployment.sh: the vLLM server exited before it was ready; see its log above" >&2
        fi
        exit 1
    fi
    if [ "$waited" -ge "$HEALTH_TIMEOUT" ]; then
        echo "vllm_deployment.sh: no healthy server after $HEALTH_TIMEOUT s (HEALTH_TIMEOUT)" >&2
        exit 1
    fi
    sleep 2
    waited=$((waited + 2))
done

echo "Sample request:"
curl -sS "$URL/v1/chat/completions" -H "Content-Type: application/json" \
    -H "Authorization: Bearer ${VLLM_API_KEY:-EMPTY}" -d "$BODY"
echo
echo "Serving $REQUEST_MODEL on $URL/v1 (OpenAI API); Ctrl-C stops it."
wait "$SERVER_PID"
