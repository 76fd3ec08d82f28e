"""Stage 2: supervised fine-tuning (SFT) on conversations, learning only what the assistant says.

    python supervised_finetuning.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --template_name qwen \\
        --train_file_dir ./data/finetune --validation_file_dir ./data/finetune --do_train --do_eval \\
        --use_peft True --model_max_length 4096 --per_device_train_batch_size 4 --learning_rate 2e-5 \\
        --output_dir outputs-sft-qwen-v1

    torchrun --nproc_per_node 2 supervised_finetuning.py ...    # data parallel
    python supervised_finetuning.py my_sft.yaml                 # options from a YAML/JSON file

Data (`.json`/`.jsonl`, found recursively): alpaca (`instruction`, `input`, `output`, optional `system`,
`history`), sharegpt (`conversations` of `from`/`value`, tool calls included) or OpenAI `messages`. Every file is
validated before the model loads: errors name `file:line`. `--template_name` picks a template from template.py;
without it the tokenizer's own chat template is used. Every assistant turn and its end-of-turn token is learned,
nothing else (`--train_on_inputs` learns everything). Conversations longer than `--model_max_length` lose whole
turns from the end; a first exchange that alone is too long is truncated (its answer cut, learning no end-of-turn
token), or skipped with `--overlong drop`. Any option of trl's SFTConfig works (`--neftune_noise_alpha`, ...).

Speed and memory: conversations are packed into rows where the attention kernel keeps them apart (`--packing`,
medicalgpt/train/packing.py), and the loss never builds the whole [tokens x vocab] logits (trl's fused LM head, or
`--chunked_loss`, medicalgpt/train/chunked_loss.py). Tokenised data is cached between runs (`--overwrite_cache`
redoes it).
"""

import logging
import sys
from dataclasses import dataclass, field

import medicalgpt.console  # noqa: F401  first: the libraries' import-time notices held back (see its docstring)

# isort: split
from trl import SFTConfig, SFTTrainer

from medicalgpt.args import DataArguments, LoraArguments, ModelArguments, SupervisedArguments
from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.eval.callback import ChoiceEvalArguments, ChoiceEvalCallback
from medicalgpt.model.adapter import wrap_with_lora
from medicalgpt.model.embeddings import resize_embeddings_for_tokenizer
from medicalgpt.model.loader import load_model, load_tokenizer
from medicalgpt.parser import parse_args
from medicalgpt.processors.display import format_label_mask
from medicalgpt.processors.sft import prepare_sft_dataset
from medicalgpt.templates import build_template
from medicalgpt.train.atomic_checkpoints import with_atomic_checkpoints
from medicalgpt.train.chunked_loss import add_chunked_lm_head, check_liger_kernel, resolve_chunked_loss
from medicalgpt.train.packing import PackedRowsCollator, pack_rows, resolve_packing
from medicalgpt.train.records import load_stage_records
from medicalgpt.train.run import check_and_log_args, train_and_evaluate
from medicalgpt.train.run_summary import add_run_summary
from medicalgpt.train.streaming import finish_sft_stream, stream_stage_records

logger = logging.getLogger("medicalgpt")


@dataclass
class SupervisedConfig(SFTConfig):
    packing: bool | None = field(
        default=None,
        metadata={
            "help": "Pack several conversations per row, attention kept apart by position_ids that restart at each. "
            "Default: on where the attention kernel honours that (flash_attention_2/3, sdpa, eager)."
        },
    )


class ChunkedLossSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss comes from medicalgpt.train.chunked_loss.chunked_lm_loss (--chunked_loss)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # logits wanted (compute_metrics): trl's own path
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = model(**inputs, chunked_loss=True, num_items_in_batch=num_items_in_batch).loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # the count is over all ranks; DDP averages gradients
        return loss


ARGUMENTS = (SupervisedConfig, ModelArguments, DataArguments, LoraArguments, SupervisedArguments, ChoiceEvalArguments)


def main(argv=None):
    training_args, model_args, data_args, lora_args, sft_args, choice_args = parse_args(*ARGUMENTS, argv=argv)
    setup_logging(training_args)
    check_liger_kernel(training_args)
    check_and_log_args(training_args, model_args, lora_args)

    # Data
    load_records = stream_stage_records if data_args.streaming else load_stage_records  # --streaming: streamed
    train_records, eval_records = load_records(data_args, training_args, stage="sft")
    choice_items = choice_args.load_items(data_args.skip_invalid_examples)  # --choice_eval_file, scored in training
    tokenizer = load_tokenizer(model_args)
    template = build_template(data_args.template_name, tokenizer)
    num_proc = data_args.preprocessing_num_workers
    tokenise = dict(
        template=template,
        tokenizer=tokenizer,
        max_length=sft_args.model_max_length,
        train_on_inputs=sft_args.train_on_inputs,
        system_prompt=data_args.system_prompt,
        num_proc=num_proc,
        overlong=sft_args.overlong,
    )
    with training_args.main_process_first(desc="tokenising"):
        train_dataset = prepare_sft_dataset(train_records, desc_suffix=" (train)", **tokenise)
        eval_dataset = prepare_sft_dataset(eval_records, desc_suffix=" (eval)", **tokenise)
    if not data_args.streaming:
        log_first_sample(train_dataset, tokenizer)

    # Model
    model = load_model(model_args)
    resize_embeddings_for_tokenizer(model, tokenizer)  # a tokenizer from build_domain_tokenizer.py
    packing = resolve_packing(training_args, model)
    if packing != "trl":  # truncated and masked above: trl's passes that truncate and filter again are skipped
        training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    eval_packing = packing if training_args.eval_packing is not False else "off"
    rows = dict(max_length=sft_args.model_max_length, streaming=data_args.streaming, num_proc=num_proc)
    with training_args.main_process_first(desc="packing"):
        train_dataset = prepare_rows(train_dataset, packing=packing, split="train", **rows)
        eval_dataset = prepare_rows(eval_dataset, packing=eval_packing, split="eval", **rows)
    chunked_loss = resolve_chunked_loss(sft_args.chunked_loss, training_args, model)
    if chunked_loss:
        add_chunked_lm_head(model)
    loss = "chunked" if chunked_loss else "trl's fused LM head"
    logger.debug("Batches: %s (--packing); attention: %s; loss: %s.", packing, model.config._attn_implementation, loss)
    model = wrap_with_lora(model, lora_args, training_args, base_path=model_args.model_name_or_path)

    # Train
    trainer_class = ChunkedLossSFTTrainer if chunked_loss else SFTTrainer
    collator = PackedRowsCollator(tokenizer.pad_token_id, pad_to_multiple_of=training_args.pad_to_multiple_of)
    trainer = with_atomic_checkpoints(trainer_class)(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator if packing == "rows" else None,
    )
    add_run_summary(trainer, model_args, data_args, lora_args, sft_args, choice_args)
    if choice_items:  # choice_accuracy logged every --choice_eval_steps (medicalgpt/eval/callback.py)
        callback = ChoiceEvalCallback(
            trainer,
            items=choice_items,
            template=template,
            eval_steps=choice_args.choice_eval_steps,
            n_shot=choice_args.choice_eval_n_shot,
            system_prompt=data_args.system_prompt,
        )
        trainer.add_callback(callback)
    train_and_evaluate(trainer, training_args)


def prepare_rows(dataset, packing, max_length, streaming, num_proc, split):
    """Tokenised conversations -> the rows the trainer reads: packed when `packing` is "rows" (medicalgpt/train/
    packing.py), else as they are. A stream also drops the conversations preprocessing skipped, and packs on the fly
    (medicalgpt/train/streaming.py). None (a split not asked for) gives None."""
    if dataset is None:
        return None
    if streaming:
        return finish_sft_stream(dataset, max_length, pack=packing == "rows")
    if packing == "rows":
        return pack_rows(dataset, max_length, num_proc, desc=f"Packing {split}")
    return dataset


def log_first_sample(train_dataset, tokenizer):
    if train_dataset is not None and len(train_dataset):
        sample = train_dataset[0]
        text = format_label_mask(sample["input_ids"], sample["labels"], tokenizer)
        logger.debug("First training sample, learned tokens in [LEARN]...[/LEARN]:\n%s", text)


if __name__ == "__main__":
    sys.exit(run_cli(main))
