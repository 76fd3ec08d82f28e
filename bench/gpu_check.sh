#!/usr/bin/env bash
# The project's GPU check, in one run: under 8 minutes on one H100 or H200 (bench/gpu_check.py says what it runs:
# bf16 SFT with flash-attn or sdpa on a Qwen2.5-0.5B-shaped model built offline, QLoRA 4-bit, ZeRO-3 on one GPU,
# the fused / chunked / plain loss's peak memory, tokens/s and MFU, packed_sdpa against sdpa's masked rows). Prints
# JSON on stdout, progress on stderr.
#
#   bash bench/gpu_check.sh              # on the GPU machine, from the repository root or anywhere
#   bash bench/gpu_check.sh --dry-run    # tiny shapes on CPU, ~1 minute: checks the script (tests/test_gpu_check.py)
#
# A GPU image that has torch, transformers, accelerate and peft but not trl or datasets (nor a network) takes them
# from a folder of wheels in the repository, .whl/ (git-ignored locally: echo /.whl/ >> .git/info/exclude), installed
# into /tmp/site first. Fetch them where pip works
# (for the GPU's Python, here 3.12; 20 MB seen, under the 64 MiB a call carries), e.g.:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.23.0 peft==0.21.2 \
#       hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#   python3 -m pip download --no-deps --no-binary=:all: -d .whl deepspeed==0.19.8     # built on the GPU machine
#
# (transformers: the image's 5.17 is older than requirements.txt's 5.23. datasets 5.2 needs pyarrow >= 24 and
# fsspec <= 2026.9.0: the environment block of the JSON lists what imported.) bitsandbytes and flash-attn are used
# when the image has them; a check whose package is missing is reported as skipped, with the reason.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null || compgen -G ".whl/*.tar.gz" >/dev/null; then
    mkdir -p /tmp/site
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl >&2 || exit 1
    fi
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    for archive in .whl/*.tar.gz; do   # deepspeed: built against the torch that is there, its ops JIT-compiled
        [ -e "$archive" ] || continue
        DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
            --target /tmp/site "$archive" >&2 || echo "could not build $archive: its check will be skipped" >&2
    done
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1 PYTHONUNBUFFERED=1
exec "$PY" bench/gpu_check.py "$@"
