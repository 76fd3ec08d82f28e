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
nothing else (`--train_on_inputs` learns everything); conversations longer than `--model_max_length` lose whole
turns from the end, never part of one. Any option of trl's SFTConfig works (`--packing`, `--neftune_noise_alpha`, ...).
"""

import logging
import sys

from trl import SFTConfig, SFTTrainer

from medicalgpt.args import DataArguments, LoraArguments, ModelArguments, SupervisedArguments
from medicalgpt.modeling import load_model, load_tokenizer, wrap_with_lora
from medicalgpt.parser import parse_args
from medicalgpt.preprocess import format_label_mask, prepare_sft_dataset
from medicalgpt.training import (
    build_template,
    find_resume_checkpoint,
    load_stage_records,
    prepare_args,
    run_cli,
    setup_logging,
    to_dataset,
    with_atomic_checkpoints,
)
from medicalgpt.vocab import resize_embeddings_for_tokenizer

logger = logging.getLogger("medicalgpt")


def main(argv=None):
    training_args, model_args, data_args, lora_args, sft_args = parse_args(
        SFTConfig, ModelArguments, DataArguments, LoraArguments, SupervisedArguments, argv=argv
    )
    setup_logging(training_args)
    training_args.max_length = sft_args.model_max_length or training_args.max_length
    training_args.dataset_num_proc = data_args.preprocessing_num_workers or training_args.dataset_num_proc
    prepare_args(training_args, model_args, lora_args)
    train_records, eval_records = load_stage_records(data_args, training_args, stage="sft")

    tokenizer = load_tokenizer(model_args)
    template = build_template(data_args, tokenizer)
    with training_args.main_process_first(desc="tokenising"):
        train_dataset, eval_dataset = (
            None if records is None else prepare_sft_dataset(
                to_dataset(records), template, tokenizer, training_args.max_length, sft_args.train_on_inputs,
                data_args.system_prompt, data_args.preprocessing_num_workers, f" ({split})",
            )
            for split, records in (("train", train_records), ("eval", eval_records))
        )  # fmt: skip
    if train_dataset is not None and len(train_dataset):
        sample = train_dataset[0]
        logger.info("First training sample, learned tokens in [LEARN]...[/LEARN]:\n%s",
                    format_label_mask(sample["input_ids"], sample["labels"], tokenizer))  # fmt: skip

    model = load_model(model_args)
    resize_embeddings_for_tokenizer(model, tokenizer)  # a tokenizer from build_domain_tokenizer.py
    model = wrap_with_lora(model, lora_args, training_args, base_path=model_args.model_name_or_path)
    trainer = with_atomic_checkpoints(SFTTrainer)(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
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
    trainer.end()
    logger.info("Outputs in %s", training_args.output_dir)


if __name__ == "__main__":
    sys.exit(run_cli(main))
