# Two commands on a fresh machine:  make quickstart   and   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TINY_MODEL := models/tiny-qwen
QUICKSTART := outputs/quickstart
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TRL_EXPERIMENTAL_SILENCE ?= 1

.PHONY: install quickstart test lint tiny-model clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

tiny-model: $(TINY_MODEL)/config.json

$(TINY_MODEL)/config.json: $(VENV)/.installed medicalgpt/tiny_model.py
	$(PY) -m medicalgpt.tiny_model --output_dir $(TINY_MODEL)

# The whole chain on the tiny model and the sample data, on CPU, in a few minutes: PT, merge, SFT, RM, PPO, DPO,
# ORPO, merge, batch inference; then a summary table and a loss-curve PNG per stage.
QUICK := --torch_dtype float32 --bf16 False --gradient_checkpointing False --gradient_accumulation_steps 1 \
	--preprocessing_num_workers 1 --logging_steps 2 --eval_steps 10 --learning_rate 2e-3
quickstart: tiny-model
	rm -rf $(QUICKSTART)
	mkdir -p $(QUICKSTART)
	PYTHON=$(abspath $(PY)) MODEL=$(TINY_MODEL) PREFIX=$(QUICKSTART)/ ORPO=1 SUMMARY=1 \
	EXTRA_ARGS="$(QUICK)" \
	EXTRA_ARGS_PT="--max_steps 20 --block_size 128 --learning_rate 1e-2" \
	EXTRA_ARGS_SFT="--max_steps 30 --model_max_length 512 --flash_attn False --learning_rate 1e-2" \
	EXTRA_ARGS_RM="--max_steps 20" \
	EXTRA_ARGS_PPO="--total_episodes 48 --response_length 32 --per_device_train_batch_size 4 --use_peft True \
		--learning_rate 1e-3 --eval_steps 4 --max_eval_samples 8 --logging_steps 1" \
	EXTRA_ARGS_DPO="--max_steps 20 --learning_rate 5e-3" \
	EXTRA_ARGS_ORPO="--max_steps 20 --orpo_beta 1.0" \
	bash run_pipeline.sh
	@echo "Outputs and loss curves are in $(QUICKSTART)/"

# Chromium (Debian's package) for the browser test of gradio_demo.py: installed when missing and apt-get can run
# as root; otherwise that test is skipped. Never fatal.
test: $(VENV)/.installed
	-@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ export DEBIAN_FRONTEND=noninteractive; apt-get install -y -qq chromium || \
		  { apt-get update -qq && apt-get install -y -qq chromium; }; } >/dev/null 2>&1; } || \
		echo "chromium is not installed: the browser test of gradio_demo.py will be skipped"
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(QUICKSTART) models/tiny-qwen
