"""Stage 3: reward modeling (RM) — a one-output scoring head on the (SFT) model, trained on preference pairs.

    python reward_modeling.py --model_name_or_path outputs-sft-qwen-v1 --template_name qwen \\
        --train_file_dir ./data/reward --validation_file_dir ./data/reward --do_train --do_eval \\
        --use_peft True --max_source_length 1024 --max_target_length 256 --learning_rate 2e-5 \\
        --output_dir outputs-rm-qwen-v1

    torchrun --nproc_per_node 2 reward_modeling.py ...     # data parallel works for RM too

Data: `{"prompt", "chosen", "rejected"}`, upstream's `{"conversations", "chosen", "rejected"}` or message lists,
validated before the model loads. The loss is trl's RewardTrainer pairwise loss, -log sigmoid(r_chosen -
r_rejected); evaluation reports pairwise accuracy and mean margin. The prompt keeps its last --max_source_length
tokens, each answer its first --max_target_length (truncated pairs are counted in the log). With LoRA the adapter
is saved with the `score` head; `ppo_training.py --reward_model_path` and `merge_peft_adapter.py` take the output.
"""

import sys

import medicalgpt.console  # noqa: F401  first: the libraries' import-time notices held back (see its docstring)

# isort: split
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from medicalgpt.args import DataArguments, LoraArguments, ModelArguments, PreferenceArguments
from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.model.adapter import wrap_with_lora
from medicalgpt.model.loader import load_model, load_tokenizer
from medicalgpt.parser import parse_args
from medicalgpt.processors.reward import to_reward_features
from medicalgpt.rl.rewards import closing_ids
from medicalgpt.templates import build_template
from medicalgpt.train.atomic_checkpoints import with_atomic_checkpoints
from medicalgpt.train.records import load_tokenized_preferences
from medicalgpt.train.run import check_and_log_args, train_and_evaluate
from medicalgpt.train.run_summary import add_run_summary


def main(argv=None):
    training_args, model_args, data_args, lora_args, pref_args = parse_args(
        RewardConfig, ModelArguments, DataArguments, LoraArguments, PreferenceArguments, argv=argv
    )
    setup_logging(training_args)
    check_and_log_args(training_args, model_args, lora_args)

    # Data
    tokenizer = load_tokenizer(model_args)
    suffix_ids = closing_ids(tokenizer, build_template(data_args.template_name, tokenizer))
    # trl drops pairs longer than max_length (--max_source_length + --max_target_length): the suffix comes on top
    training_args.max_length += len(suffix_ids)
    train_pairs, eval_pairs = load_tokenized_preferences(data_args, training_args, pref_args, tokenizer)
    num_proc = data_args.preprocessing_num_workers
    train_dataset = to_reward_features(train_pairs, num_proc=num_proc, suffix_ids=suffix_ids)
    eval_dataset = to_reward_features(eval_pairs, num_proc=num_proc, suffix_ids=suffix_ids)

    # Model
    model = load_model(model_args, model_class=AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model = wrap_with_lora(model, lora_args, training_args, model_args.model_name_or_path, task_type="SEQ_CLS")

    # Train
    trainer = with_atomic_checkpoints(RewardTrainer)(
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
