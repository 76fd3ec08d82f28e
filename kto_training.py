"""Stage 3, alternative: KTO — align the SFT model with answers judged one at a time (thumbs up / down), no pairs.

    python kto_training.py --model_name_or_path outputs-sft-qwen-v1 --template_name qwen \\
        --train_file_dir ./data/kto --validation_file_dir ./data/kto --do_train --do_eval \\
        --use_peft True --max_source_length 1024 --max_target_length 512 --max_steps 100 \\
        --per_device_train_batch_size 4 --learning_rate 5e-6 --output_dir outputs-kto-qwen-v1

Data: one answer and a boolean `label` per record, in the shapes the other stages read (`prompt` + `completion`, a
sharegpt `conversations` or OpenAI `messages` list ending with the judged answer, alpaca `instruction` + `output`);
preference pairs are accepted too, each as one desirable and one undesirable answer (medicalgpt/data/unpaired.py).
`python validate_jsonl.py FILE --stage kto` checks a file. `--desirable_weight` / `--undesirable_weight` weigh the
two classes; their balance is logged with the range the KTO paper advises. `--model_name_or_path` may be the SFT
stage's LoRA adapter directory, and the reference model is that model with the new adapter disabled (a frozen copy
without LoRA), as in dpo_training.py. Any option of trl's KTOConfig works (`--beta`, `--loss_type`, ...).
"""

import sys

import medicalgpt.console  # noqa: F401  first: the libraries' import-time notices held back (see its docstring)

# isort: split
from trl import KTOConfig

from medicalgpt.args import DataArguments, LoraArguments, ModelArguments, PreferenceArguments
from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.model.adapter import wrap_with_lora
from medicalgpt.model.loader import load_model, load_tokenizer
from medicalgpt.parser import parse_args
from medicalgpt.precision import set_frozen_precision
from medicalgpt.train.atomic_checkpoints import with_atomic_checkpoints
from medicalgpt.train.records import load_tokenized_unpaired
from medicalgpt.train.run import check_and_log_args, train_and_evaluate
from medicalgpt.train.run_summary import add_run_summary
from medicalgpt.train.trainers import PreTokenizedKTOTrainer


def main(argv=None):
    training_args, model_args, data_args, lora_args, pref_args = parse_args(
        KTOConfig, ModelArguments, DataArguments, LoraArguments, PreferenceArguments, argv=argv
    )
    setup_logging(training_args)
    check_and_log_args(training_args, model_args, lora_args)

    # Data
    tokenizer = load_tokenizer(model_args)
    train_dataset, eval_dataset = load_tokenized_unpaired(data_args, training_args, pref_args, tokenizer)

    # Model
    model = wrap_with_lora(load_model(model_args), lora_args, training_args, model_args.model_name_or_path)
    # LoRA: the base with the adapter disabled; else a frozen copy computing as the policy does
    reference = None if lora_args.use_peft else set_frozen_precision(load_model(model_args), training_args)

    # Train
    trainer = with_atomic_checkpoints(PreTokenizedKTOTrainer)(
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
