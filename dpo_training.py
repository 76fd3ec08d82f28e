"""Stage 3, alternative: DPO — align the SFT model with preference pairs directly, no reward model.

    python dpo_training.py --model_name_or_path outputs-sft-qwen-v1 --template_name qwen \\
        --train_file_dir ./data/reward --validation_file_dir ./data/reward --do_train --do_eval \\
        --use_peft True --max_source_length 1024 --max_target_length 512 --max_steps 100 \\
        --output_dir outputs-dpo-qwen-v1

`--model_name_or_path` may be the SFT stage's LoRA adapter directory: it is merged into its base, and the DPO
adapter records that directory as its base. With LoRA the reference model is the same weights with the adapter
disabled (no second copy); with full fine-tuning a second copy is loaded as the frozen reference. Any option of
trl's DPOConfig works (`--beta`, `--loss_type sigmoid|ipo|...`, `--learning_rate`, ...).
"""

import sys

import medicalgpt.console  # noqa: F401  first: the libraries' import-time notices held back (see its docstring)

# isort: split
from trl import DPOConfig

from medicalgpt.args import DataArguments, LoraArguments, ModelArguments, PreferenceArguments
from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.model.adapter import wrap_with_lora
from medicalgpt.model.loader import load_model, load_tokenizer
from medicalgpt.parser import parse_args
from medicalgpt.precision import set_frozen_precision
from medicalgpt.train.atomic_checkpoints import with_atomic_checkpoints
from medicalgpt.train.records import load_tokenized_preferences
from medicalgpt.train.run import check_and_log_args, train_and_evaluate
from medicalgpt.train.run_summary import add_run_summary
from medicalgpt.train.trainers import PreTokenizedDPOTrainer


def main(argv=None):
    training_args, model_args, data_args, lora_args, pref_args = parse_args(
        DPOConfig, ModelArguments, DataArguments, LoraArguments, PreferenceArguments, argv=argv
    )
    setup_logging(training_args)
    check_and_log_args(training_args, model_args, lora_args)

    # Data
    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset = load_tokenized_preferences(data_args, training_args, pref_args, tokenizer)

    # Model
    model = wrap_with_lora(load_model(model_args), lora_args, training_args, model_args.model_name_or_path)
    # LoRA: the base with the adapter disabled; else a frozen copy computing as the policy does
    reference = None if lora_args.use_peft else set_frozen_precision(load_model(model_args), training_args)

    # Train
    trainer = with_atomic_checkpoints(PreTokenizedDPOTrainer)(
        model=model,
        ref_model=reference,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    add_run_summary(trainer, model_args, data_args, lora_args, pref_args)
    train_and_evaluate(trainer, training_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
