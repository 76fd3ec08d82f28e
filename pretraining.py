"""Stage 1: continued pretraining (PT) of a causal language model on plain domain text.

    python pretraining.py --model_name_or_path Qwen/Qwen2.5-0.5B --train_file_dir ./data/pretrain \\
        --validation_file_dir ./data/pretrain --do_train --do_eval --use_peft True --block_size 512 \\
        --per_device_train_batch_size 4 --num_train_epochs 1 --learning_rate 2e-4 --output_dir outputs-pt-qwen-v1

    torchrun --nproc_per_node 2 pretraining.py ...      # data parallel (NCCL on GPUs, gloo on CPU)
    python pretraining.py my_pt.yaml --max_steps 10    # options from a YAML/JSON file, the command line wins

Data: `.txt` files (one document per line) or `.json`/`.jsonl` records with "text", found recursively. Each
document ends with EOS; documents are concatenated and cut into --block_size blocks (the tail is a shorter block).
Outputs: a LoRA adapter (with --use_peft) or full weights, the tokenizer, trainer_state.json, *_results.json, and
TensorBoard logs in output_dir/runs with --report_to tensorboard. Re-running resumes from the last checkpoint.
"""

import logging
import math
import sys

import medicalgpt.console  # noqa: F401  first: the libraries' import-time notices held back (see its docstring)

# isort: split
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from medicalgpt.args import DataArguments, LoraArguments, ModelArguments, PretrainingArguments
from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.constants import IGNORE_INDEX
from medicalgpt.model.adapter import wrap_with_lora
from medicalgpt.model.embeddings import resize_embeddings_for_tokenizer
from medicalgpt.model.loader import load_model, load_tokenizer
from medicalgpt.parser import parse_args
from medicalgpt.processors.pt import prepare_pretraining_dataset
from medicalgpt.train.atomic_checkpoints import with_atomic_checkpoints
from medicalgpt.train.records import load_stage_records
from medicalgpt.train.run import check_and_log_args, train_and_evaluate
from medicalgpt.train.run_summary import add_run_summary
from medicalgpt.train.streaming import stream_stage_records

logger = logging.getLogger("medicalgpt")


ARGUMENTS = (TrainingArguments, ModelArguments, DataArguments, LoraArguments, PretrainingArguments)


def main(argv=None):
    training_args, model_args, data_args, lora_args, pt_args = parse_args(*ARGUMENTS, argv=argv)
    setup_logging(training_args)
    check_and_log_args(training_args, model_args, lora_args)

    # Data
    load_records = stream_stage_records if data_args.streaming else load_stage_records  # --streaming: streamed
    train_records, eval_records = load_records(data_args, training_args, stage="pt")
    tokenizer = load_tokenizer(model_args)
    block_size = pt_args.block_size or min(1024, tokenizer.model_max_length)
    if block_size > tokenizer.model_max_length:
        logger.warning(
            "--block_size %d exceeds the tokenizer's model_max_length %d", block_size, tokenizer.model_max_length
        )
    blocks = dict(tokenizer=tokenizer, block_size=block_size, num_proc=data_args.preprocessing_num_workers)
    with training_args.main_process_first(desc="tokenising"):
        train_dataset = prepare_pretraining_dataset(train_records, desc_suffix=" (train)", **blocks)
        eval_dataset = prepare_pretraining_dataset(eval_records, desc_suffix=" (eval)", **blocks)
    if not data_args.streaming:  # a stream has no length
        logger.info("Blocks of %d tokens: %d for training.", block_size, len(train_dataset or []))

    # Model
    model = load_model(model_args)
    resize_embeddings_for_tokenizer(model, tokenizer)  # a tokenizer from build_domain_tokenizer.py
    model = wrap_with_lora(model, lora_args, training_args, base_path=model_args.model_name_or_path)

    # Train
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)
    trainer = with_atomic_checkpoints(Trainer)(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
    )
    add_run_summary(trainer, model_args, data_args, lora_args, pt_args)
    train_and_evaluate(trainer, training_args, eval_extras=perplexity)


def perplexity(metrics):
    return {"perplexity": math.exp(min(metrics["eval_loss"], 50))}  # capped: exp overflows past ~709


if __name__ == "__main__":
    sys.exit(run_cli(main))
