#!/bin/sh
# LLaMA-Factory in its own environment for bench/sft_throughput.py: it pins transformers <= 5.6, trl <= 0.24,
# peft <= 0.18.1, datasets <= 4.0, which this project's environment does not have.
#   sh bench/setup_llamafactory.sh            # -> bench/.venv-llamafactory (git-ignored)
set -e
VENV="${VENV:-$(dirname "$0")/.venv-llamafactory}"
TORCH="${TORCH:-torch==2.13.0}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "$TORCH"
CONSTRAINTS="$(mktemp)"
echo "$TORCH" > "$CONSTRAINTS"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" llamafactory==0.9.5
rm -f "$CONSTRAINTS"
# PyPI's torchvision / torchaudio wheels do not load with a CPU torch; text-only training needs neither, but
# LLaMA-Factory imports torchaudio at module level (llamafactory/data/mm_plugin.py): an empty package satisfies it.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio || true
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
mkdir -p "$SITE/torchaudio" && touch "$SITE/torchaudio/__init__.py"
DISABLE_VERSION_CHECK=1 "$VENV/bin/python" -c "import llamafactory; print('LLaMA-Factory', llamafactory.__version__)"
