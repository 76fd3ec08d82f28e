"""Stage 3, alternative: ORPO — SFT and preference alignment in one step, no reference model.

    python orpo_training.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --template_name qwen \\
        --train_file_dir ./data/reward --validation_file_dir ./data/reward --do_train --do_eval \\
        --use_peft True --max_source_length 1024 --max_target_length 512 --max_steps 100 \\
        --output_dir outputs-orpo-qwen-v1

Same data, templates and flags as dpo_training.py. The loss is the chosen answer's NLL plus beta times the
odds-ratio term (trl.experimental.orpo); `--orpo_beta` is upstream's name for `--beta`. Note ORPOConfig's default
learning rate is 1e-6: pass `--learning_rate` for LoRA (e.g. 5e-5).
"""

import sys
from dataclasses import dataclass, field

import medicalgpt.console  # noqa: F401  first: the libraries' import-time notices held back (see its docstring)

# isort: split
from trl.experimental.orpo import ORPOConfig

from medicalgpt.args import DataArguments, LoraArguments, ModelArguments, OrpoArguments, PreferenceArguments
from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.model.adapter import wrap_with_lora
from medicalgpt.model.loader import load_model, load_tokenizer
from medicalgpt.parser import parse_args
from medicalgpt.train.atomic_checkpoints import with_atomic_checkpoints
from medicalgpt.train.records import load_tokenized_preferences
from medicalgpt.train.run import check_and_log_args, train_and_evaluate
from medicalgpt.train.run_summary import add_run_summary
from medicalgpt.train.trainers import PreTokenizedORPOTrainer


@dataclass
class OrpoConfig(ORPOConfig):
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep the dataset's columns: ORPO's collator reads them (trl 1.16 unsets it, warning)."},
    )


def main(argv=None):
    training_args, model_args, data_args, lora_args, pref_args, _ = parse_args(
        OrpoConfig, ModelArguments, DataArguments, LoraArguments, PreferenceArguments, OrpoArguments, argv=argv
    )
    setup_logging(training_args)
    check_and_log_args(training_args, model_args, lora_args)

    # Data
    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset = load_tokenized_preferences(data_args, training_args, pref_args, tokenizer)

    # Model
    model = wrap_with_lora(load_model(model_args), lora_args, training_args, model_args.model_name_or_path)

    # Train
    trainer = with_atomic_checkpoints(PreTokenizedORPOTrainer)(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    add_run_summary(trainer, model_args, data_args, lora_args, pref_args)
    train_and_evaluate(trainer, training_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
