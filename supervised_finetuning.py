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
`--chunked_loss`, medicalgpt/train/losses.py). Tokenised data is cached between runs (`--overwrite_cache` redoes it).
"""

import logging
import sys
from dataclasses import dataclass, field

from trl import SFTConfig, SFTTrainer

from medicalgpt.args import DataArguments, LoraArguments, ModelArguments, SupervisedArguments
from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.data.vocab import resize_embeddings_for_tokenizer
from medicalgpt.eval.tasks import ChoiceEvalArguments, ChoiceEvalCallback
from medicalgpt.modeling import load_model, load_tokenizer, wrap_with_lora
from medicalgpt.parser import parse_args
from medicalgpt.templates import build_template
from medicalgpt.train.checkpoints import with_atomic_checkpoints
from medicalgpt.train.losses import add_chunked_lm_head, check_liger_kernel, resolve_chunked_loss
from medicalgpt.train.packing import PackedRowsCollator, pack_rows, resolve_packing
from medicalgpt.train.preprocess import format_label_mask, prepare_sft_dataset
from medicalgpt.train.records import load_stage_records, to_dataset
from medicalgpt.train.run import end_training, find_resume_checkpoint, prepare_args

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
    """SFTTrainer whose loss comes from medicalgpt.train.losses.chunked_lm_loss (--chunked_loss)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # logits wanted (compute_metrics): trl's own path
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = model(**inputs, chunked_loss=True, num_items_in_batch=num_items_in_batch).loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # the count is over all ranks; DDP averages gradients
        return loss


def main(argv=None):
    training_args, model_args, data_args, lora_args, sft_args, choice_args = parse_args(
        SupervisedConfig, ModelArguments, DataArguments, LoraArguments, SupervisedArguments, ChoiceEvalArguments,
        argv=argv,
    )  # fmt: skip
    setup_logging(training_args)
    check_liger_kernel(training_args)
    training_args.max_length = sft_args.model_max_length or training_args.max_length
    training_args.dataset_num_proc = data_args.preprocessing_num_workers or training_args.dataset_num_proc
    prepare_args(training_args, model_args, lora_args)
    train_records, eval_records = load_stage_records(data_args, training_args, stage="sft")
    choice_items = choice_args.load_items(data_args.skip_invalid_examples)  # --choice_eval_file, scored in training

    tokenizer = load_tokenizer(model_args)
    template = build_template(data_args.template_name, tokenizer)
    with training_args.main_process_first(desc="tokenising"):
        train_dataset, eval_dataset = (
            None if records is None else prepare_sft_dataset(
                to_dataset(records, overwrite=data_args.overwrite_cache), template, tokenizer,
                training_args.max_length, sft_args.train_on_inputs, data_args.system_prompt,
                data_args.preprocessing_num_workers, f" ({split})", sft_args.overlong,
            )
            for split, records in (("train", train_records), ("eval", eval_records))
        )  # fmt: skip
    if train_dataset is not None and len(train_dataset):
        sample = train_dataset[0]
        logger.info("First training sample, learned tokens in [LEARN]...[/LEARN]:\n%s",
                    format_label_mask(sample["input_ids"], sample["labels"], tokenizer))  # fmt: skip

    model = load_model(model_args)
    resize_embeddings_for_tokenizer(model, tokenizer)  # a tokenizer from build_domain_tokenizer.py
    packing = resolve_packing(training_args, model)
    if packing == "rows":
        with training_args.main_process_first(desc="packing"):
            train_dataset, eval_dataset = (
                pack_rows(dataset, training_args.max_length, data_args.preprocessing_num_workers, f"Packing {split}")
                if dataset is not None and (split == "train" or training_args.eval_packing is not False) else dataset
                for split, dataset in (("train", train_dataset), ("eval", eval_dataset))
            )  # fmt: skip
    chunked_loss = resolve_chunked_loss(sft_args.chunked_loss, training_args, model)
    if chunked_loss:
        add_chunked_lm_head(model)
    loss = "chunked (--chunked_loss)" if chunked_loss else "trl's fused LM head"
    logger.info("Batches: %s (--packing); loss: %s.", packing, loss)
    model = wrap_with_lora(model, lora_args, training_args, base_path=model_args.model_name_or_path)
    collator = PackedRowsCollator(tokenizer.pad_token_id, pad_to_multiple_of=training_args.pad_to_multiple_of)
    trainer = with_atomic_checkpoints(ChunkedLossSFTTrainer if chunked_loss else SFTTrainer)(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator if packing == "rows" else None,
    )
    if choice_items:  # choice_accuracy logged every --choice_eval_steps (medicalgpt/eval/tasks.py)
        trainer.add_callback(ChoiceEvalCallback(
            trainer, choice_items, template, choice_args.choice_eval_steps, choice_args.choice_eval_n_shot,
            system_prompt=data_args.system_prompt,
        ))  # fmt: skip
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=find_resume_checkpoint(training_args))
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    end_training(trainer.accelerator, trainer.model_wrapped)
    logger.info("Outputs in %s", training_args.output_dir)


if __name__ == "__main__":
    sys.exit(run_cli(main))
