"""On-policy distillation: a small student learns a larger teacher's next-token distributions on its own answers.

    python distill_training.py --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --teacher_model_name_or_path Qwen/Qwen2.5-7B-Instruct --teacher_load_in_4bit True --template_name qwen \\
        --train_file_dir ./data/finetune --validation_file_dir ./data/finetune --do_train --do_eval \\
        --use_peft True --lmbda 0.5 --beta 0.5 --max_new_tokens 128 --max_length 1024 --max_prompt_length 512 \\
        --learning_rate 1e-4 --output_dir outputs-distill-qwen-v1

    bash run_distill.sh                                  # the same, with the tutorial's other settings

trl's GKDTrainer (generalized knowledge distillation; medicalgpt/train/distill.py): at every answer token the loss
is the generalized JSD between teacher and student distributions (`--beta 0`: KL(teacher || student), `--beta 1`:
KL(student || teacher)). With probability `--lmbda` a batch's answers are sampled from the student (on-policy, at
`--temperature`, up to `--max_new_tokens`), else taken from the data (`--seq_kd True`: sampled from the teacher).
The teacher (a model or a LoRA adapter directory) is frozen, in 4/8-bit with `--teacher_load_in_4bit` /
`--teacher_load_in_8bit` (bitsandbytes), and must share the student's tokenizer. The student trains a LoRA adapter
(`--use_peft True`; QLoRA with `--load_in_4bit`) or all its weights. Upstream's `--opd_lambda` / `--opd_beta` work.

Data: SFT records (alpaca, sharegpt or messages); each assistant turn is one example, its prompt the conversation
before it. Every evaluation reports `eval_teacher_kl`, the exact mean per-token KL(teacher || student) on the
evaluation answers (`--eval_on_start True` gives the value before training). The output is an adapter (or model)
like SFT's: inference.py, merge_peft_adapter.py and the next stages load it.
"""

import logging
import sys

import medicalgpt.console  # noqa: F401  first: the libraries' import-time notices held back (see its docstring)

# isort: split
from trl.experimental.gkd import GKDConfig

from medicalgpt.args import DataArguments, LoraArguments, ModelArguments
from medicalgpt.cli import run_cli, setup_logging
from medicalgpt.model.adapter import wrap_with_lora
from medicalgpt.model.loader import load_model, load_tokenizer
from medicalgpt.parser import parse_args
from medicalgpt.templates import build_template
from medicalgpt.train.atomic_checkpoints import with_atomic_checkpoints
from medicalgpt.train.distill import (
    DistillArguments,
    DistillTrainer,
    fit_teacher_vocabulary,
    load_teacher,
    prepare_distill_dataset,
    reconcile_distill_args,
    set_stop_tokens,
)
from medicalgpt.train.records import load_stage_records
from medicalgpt.train.run import check_and_log_args, train_and_evaluate
from medicalgpt.train.run_summary import add_run_summary

logger = logging.getLogger("medicalgpt")


def main(argv=None):
    training_args, model_args, data_args, lora_args, distill_args = parse_args(
        GKDConfig, ModelArguments, DataArguments, LoraArguments, DistillArguments, argv=argv
    )
    setup_logging(training_args)
    reconcile_distill_args(training_args, distill_args)
    check_and_log_args(training_args, model_args, lora_args)

    # Data
    train_records, eval_records = load_stage_records(data_args, training_args, stage="sft")
    tokenizer = load_tokenizer(model_args)
    template = build_template(data_args.template_name, tokenizer)
    tokenise = dict(
        template=template,
        tokenizer=tokenizer,
        max_length=training_args.max_length,
        max_prompt_length=distill_args.max_prompt_length,
        system_prompt=data_args.system_prompt,
        num_proc=data_args.preprocessing_num_workers,
    )
    with training_args.main_process_first(desc="tokenising"):
        train_dataset = prepare_distill_dataset(train_records, desc_suffix=" (train)", **tokenise)
        eval_dataset = prepare_distill_dataset(eval_records, desc_suffix=" (eval)", **tokenise)

    # Model
    teacher = load_teacher(model_args, distill_args, training_args, tokenizer)
    student = load_model(model_args)
    fit_teacher_vocabulary(teacher, student, tokenizer)
    set_stop_tokens(student, tokenizer, template)
    student = wrap_with_lora(student, lora_args, training_args, base_path=model_args.model_name_or_path)
    logger.info(
        "Distilling %s into %s: on-policy share %.2f (--lmbda), divergence beta %.2f (--beta).",
        training_args.teacher_model_name_or_path,
        model_args.model_name_or_path,
        training_args.lmbda,
        training_args.beta,
    )

    # Train
    trainer = with_atomic_checkpoints(DistillTrainer)(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    add_run_summary(trainer, model_args, data_args, lora_args, distill_args)
    train_and_evaluate(trainer, training_args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
