"""On-policy distillation (distill_training.py): a frozen teacher, a student that learns its next-token distribution.

The loss is trl's generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024, trl.experimental.gkd in trl 1.16)
between the teacher's and the student's distributions at every token of an answer, summed over the vocabulary:
`--beta 0` is KL(teacher || student), `--beta 1` KL(student || teacher), in between the JSD mixing them. With
probability `--lmbda` a batch's answers are sampled from the student itself (on-policy: the teacher corrects the
mistakes the student actually makes), otherwise they are the answers in the data (off-policy); `--seq_kd` samples
them from the teacher instead.

Data: SFT records. Every assistant turn is one example: its prompt is the conversation before it, rendered with the
template exactly as SFT renders it (the same token ids), keeping its last `--max_prompt_length` tokens; its answer
(with the end-of-turn token) is cut to fit `--max_length`.

Measured: `teacher_kl`, the mean over answer tokens of KL(teacher || student), computed exactly on the evaluation
answers at every evaluation (`eval_teacher_kl`), whatever `--beta` trains.
"""

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from trl.experimental.gkd import GKDTrainer

from medicalgpt.errors import UsageError
from medicalgpt.model.loader import load_model, load_tokenizer
from medicalgpt.sharding import output_rows
from medicalgpt.templates import leading_bos

logger = logging.getLogger("medicalgpt")


@dataclass
class DistillArguments:
    teacher_load_in_4bit: bool = field(
        default=False, metadata={"help": "Load the teacher in 4-bit NF4 (bitsandbytes): a quarter of its memory."}
    )
    teacher_load_in_8bit: bool = field(default=False, metadata={"help": "Load the teacher in 8-bit (bitsandbytes)."})
    max_prompt_length: int = field(
        default=512,
        metadata={"help": "Prompt tokens kept (the last ones: the question nearest the answer); below --max_length."},
    )
    opd_lambda: float | None = field(default=None, metadata={"help": "Upstream's name for --lmbda."})
    opd_beta: float | None = field(default=None, metadata={"help": "Upstream's name for --beta."})

    def __post_init__(self):
        if self.teacher_load_in_4bit and self.teacher_load_in_8bit:
            raise ValueError("--teacher_load_in_4bit and --teacher_load_in_8bit exclude each other: pick one.")
        if self.max_prompt_length < 1:
            raise ValueError("--max_prompt_length must be at least 1.")
        for name in ("opd_lambda", "opd_beta"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"--{name} must be between 0 and 1, got {value}")


def reconcile_distill_args(training_args, distill_args):
    """Upstream's --opd_lambda / --opd_beta, and the lengths checked against each other, before any model loads."""
    if distill_args.opd_lambda is not None:
        training_args.lmbda = distill_args.opd_lambda
    if distill_args.opd_beta is not None:
        training_args.beta = distill_args.opd_beta
    if not training_args.teacher_model_name_or_path:
        raise UsageError("--teacher_model_name_or_path is required: the model to distill from.")
    if training_args.max_length is None or distill_args.max_prompt_length >= training_args.max_length:
        raise UsageError(
            f"--max_prompt_length ({distill_args.max_prompt_length}) must be below --max_length "
            f"({training_args.max_length}): the answer needs room."
        )


# -- data ----------------------------------------------------------------------------------------------------------


def tokenize_for_distillation(record, template, tokenizer, max_length, max_prompt_length, system_prompt=None):
    """One normalised SFT record -> {"input_ids": [...], "completion_mask": [...]} per assistant turn: the prompt
    (everything before the turn, 0s in the mask) then the answer with its end-of-turn token (1s). The pieces are
    encoded as SFT encodes them (medicalgpt.processors.sft.tokenize_conversation), so the ids are SFT's."""
    system = record.get("system")
    turns = template.render_turns(
        record["messages"], system_prompt=system if system is not None else system_prompt, tools=record.get("tools")
    )
    context = leading_bos(tokenizer, turns[0][0]) if turns else []
    text, examples = "", []
    for prompt, response in turns:
        context, text = context + tokenizer.encode(prompt, add_special_tokens=False), text + prompt
        answer_ids = tokenizer.encode(response, add_special_tokens=False)
        if answer_ids:
            prompt_ids = context[-max_prompt_length:]
            kept = answer_ids[: max_length - len(prompt_ids)]
            examples.append(
                {
                    "input_ids": prompt_ids + kept,
                    "completion_mask": [0] * len(prompt_ids) + [1] * len(kept),
                    "prompt": text,  # unused where completion_mask is given, but trl 1.16's collator reads the key
                }
            )
        context, text = context + answer_ids, text + response
    return examples


def prepare_distill_dataset(
    dataset, template, tokenizer, max_length, max_prompt_length, system_prompt=None, num_proc=None, desc_suffix=""
):
    """Dataset of normalised SFT records -> {"input_ids", "completion_mask", "prompt"}, one row per assistant turn,
    the columns trl's DataCollatorForChatML (GKDTrainer's collator) reads: it splits each row into prompt and answer
    at the mask's first 1. None (a split that was not asked for) gives None."""
    if dataset is None:
        return None

    def tokenize(batch):
        records = [dict(zip(batch, values)) for values in zip(*batch.values())]
        rows = [
            row
            for record in records
            for row in tokenize_for_distillation(
                record, template, tokenizer, max_length, max_prompt_length, system_prompt
            )
        ]
        return {key: [row[key] for row in rows] for key in ("input_ids", "completion_mask", "prompt")}

    return dataset.map(
        tokenize,
        batched=True,
        num_proc=num_proc,
        remove_columns=dataset.column_names,
        desc=f"Tokenising prompts and answers{desc_suffix}",
    )


# -- models --------------------------------------------------------------------------------------------------------


def load_teacher(model_args, distill_args, training_args, student_tokenizer):
    """The teacher (a model or a LoRA adapter directory, merged), frozen in eval mode, optionally 4/8-bit. It must
    share the student's vocabulary: the loss compares the two distributions token by token."""
    path = training_args.teacher_model_name_or_path
    teacher_args = dataclasses.replace(
        model_args,
        model_name_or_path=path,
        tokenizer_name_or_path=None,
        load_in_4bit=distill_args.teacher_load_in_4bit,
        load_in_8bit=distill_args.teacher_load_in_8bit,
    )
    if load_tokenizer(teacher_args).get_vocab() != student_tokenizer.get_vocab():
        raise UsageError(
            f"--teacher_model_name_or_path {path}: its tokenizer differs from the student's; distillation compares "
            "next-token distributions over one shared vocabulary (same tokenizer family, e.g. Qwen2.5-7B -> 0.5B)."
        )
    teacher = load_model(teacher_args).eval()
    teacher.requires_grad_(False)
    return teacher


def fit_teacher_vocabulary(teacher, student, tokenizer):
    """A teacher whose output layer has more rows than the student's keeps only the student's: Qwen2.5-7B pads its
    vocabulary to 152,064 rows and 0.5B to 151,936, both beyond the tokenizer's 151,665 tokens, and trl's GKDTrainer
    compares the two distributions row by row (it refuses different sizes). Dropping rows no token uses leaves every
    real token's logit as it was."""
    size, teacher_size = output_rows(student), output_rows(teacher)  # ZeRO-3: ds_shape (medicalgpt/sharding.py)
    if teacher_size == size:
        return
    if teacher_size < size or len(tokenizer) > size:
        raise UsageError(
            f"--teacher_model_name_or_path: the teacher has {teacher_size} vocabulary rows and the student {size} "
            f"(the tokenizer {len(tokenizer)} tokens); distillation needs the teacher to cover the student's"
        )
    logger.info(
        "The teacher's %d vocabulary rows are cut to the student's %d (no token uses the rest).", teacher_size, size
    )
    teacher.resize_token_embeddings(size, mean_resizing=False)


def set_stop_tokens(model, tokenizer, template):
    """On-policy answers end at the template's end-of-turn token or EOS: GKDTrainer's sampling reads them from the
    model's generation config, which a full student also saves with its weights."""
    stop_ids = tokenizer.encode(template.stop_str, add_special_tokens=False) if template.stop_str else []
    ids = stop_ids if len(stop_ids) == 1 else []  # a multi-token stop string cannot end generate(): EOS only
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    model.generation_config.eos_token_id = ids
    return ids


# -- the measure ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_kl(student, teacher, rows, batch_size=8):
    """Mean over answer tokens of KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v)), exactly, on `rows`
    of {"input_ids", "completion_mask"} (the same tokens for both models). Returns (mean, tokens)."""
    device = next(student.parameters()).device
    total, tokens = torch.zeros((), dtype=torch.float64), 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = max(len(row["input_ids"]) for row in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention, scored = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
        for i, row in enumerate(batch):  # right padding: the models see the same positions as unpadded
            n = len(row["input_ids"])
            ids[i, :n], attention[i, :n] = torch.tensor(row["input_ids"]), 1
            scored[i, :n] = torch.tensor(row["completion_mask"], dtype=torch.bool)
        ids, attention, scored = ids.to(device), attention.to(device), scored.to(device)
        student_logp = F.log_softmax(student(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), -1)
        teacher_out = teacher(input_ids=ids.to(teacher.device), attention_mask=attention.to(teacher.device))
        teacher_logp = F.log_softmax(teacher_out.logits[:, :-1].float().to(device), -1)
        mask = scored[:, 1:]  # the logits at position i predict token i + 1
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
        total += kl[mask].double().sum().cpu()
        tokens += int(mask.sum())
    return (total / max(tokens, 1)).item(), tokens


class DistillTrainer(GKDTrainer):
    """trl's GKDTrainer; every evaluation also reports `teacher_kl` (see teacher_kl) on the evaluation answers."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None or isinstance(dataset, dict):
            return metrics
        student = self.accelerator.unwrap_model(self.model)
        was_training = student.training
        student.eval()
        kl, _ = teacher_kl(student, self.teacher_model, list(dataset), self.args.per_device_eval_batch_size)
        student.train(was_training)
        metrics[f"{metric_key_prefix}_teacher_kl"] = kl
        self.log({f"{metric_key_prefix}_teacher_kl": kl})
        return metrics
