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

# Continued pretraining then SFT of the tiny model on the sample data, on CPU, in a few minutes.
quickstart: tiny-model
	$(PY) pretraining.py --model_name_or_path $(TINY_MODEL) \
		--train_file_dir data/pretrain --validation_file_dir data/pretrain \
		--do_train --do_eval --eval_on_start True --eval_strategy epoch --max_eval_samples 20 \
		--block_size 256 --per_device_train_batch_size 8 --num_train_epochs 3 \
		--learning_rate 2e-3 --warmup_ratio 0.05 --logging_steps 5 --logging_first_step True \
		--save_strategy epoch --save_total_limit 1 --report_to tensorboard \
		--output_dir $(QUICKSTART)-pt --overwrite_output_dir
	$(PY) supervised_finetuning.py --model_name_or_path $(QUICKSTART)-pt --template_name qwen \
		--train_file_dir data/finetune --validation_file_dir data/finetune \
		--do_train --do_eval --eval_on_start True --eval_strategy epoch --max_eval_samples 20 \
		--use_peft True --target_modules all --lora_rank 16 --lora_alpha 32 \
		--model_max_length 512 --per_device_train_batch_size 8 --num_train_epochs 3 \
		--learning_rate 2e-3 --warmup_ratio 0.05 --logging_steps 5 --logging_first_step True \
		--bf16 False --gradient_checkpointing False \
		--save_strategy epoch --save_total_limit 1 --report_to tensorboard \
		--output_dir $(QUICKSTART)-sft --overwrite_output_dir
	$(PY) -m medicalgpt.summary $(QUICKSTART)-pt $(QUICKSTART)-sft

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(QUICKSTART)-* models/tiny-qwen
