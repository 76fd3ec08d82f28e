"""The three tasks of evaluate.py, and ChoiceEvalCallback, which runs the choice task while SFT trains.

choice      Scored in medicalgpt/eval/choice.py (log-likelihood of each candidate answer, as lm-evaluation-harness;
            or letters parsed from generated replies).
perplexity  Documents are tokenised as pretraining.py tokenises them (tokenizer(text) + EOS, concatenated). Windows
            of `block_size` tokens advance by `stride`; each scores the tokens the previous windows did not, so
            every token but the first is scored once, with at least block_size - stride tokens of context. With
            stride = block_size (the default) the windows are pretraining.py's blocks, and the perplexity is
            exp(eval_loss) of `pretraining.py --do_eval` on the same text: exactly when every block is full (the
            Trainer averages a shorter block per batch; pretraining.py also cuts each 1000 documents apart).
qa          Answers are generated in batches by the chat engine (greedy by default) and compared with the
            references: ROUGE-L F1 and BLEU, on characters for Chinese and words for English, 0-100
            (medicalgpt/eval/text_metrics.py).
"""

import logging
import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import TrainerCallback

from medicalgpt.data.validate import Issue
from medicalgpt.errors import DataValidationError, UsageError
from medicalgpt.eval.choice import run_choice
from medicalgpt.eval.items import load_eval_items
from medicalgpt.eval.scoring import pad_id_of, span_logprobs
from medicalgpt.eval.text_metrics import text_scores

logger = logging.getLogger(__name__)


def load_scoring_model(chat_args):
    """(model, tokenizer) of --base_model (+ --lora_model, merged), as load_chat_engine loads them, with no
    conversation template needed (perplexity and plain-format prompts work on base models without one)."""
    from medicalgpt.model.adapter import read_adapter_base
    from medicalgpt.model.loader import load_model, load_model_with_adapter, load_tokenizer
    from medicalgpt.serve.chat import tokenizer_source

    model_args = chat_args.model_arguments()
    if chat_args.lora_model and not read_adapter_base(chat_args.lora_model):
        raise UsageError(f"--lora_model {chat_args.lora_model}: not a LoRA adapter directory (no adapter_config.json)")
    tokenizer = load_tokenizer(model_args, tokenizer_source(chat_args))
    if chat_args.lora_model:
        model = load_model_with_adapter(model_args, chat_args.lora_model, tokenizer=tokenizer)
    else:
        model = load_model(model_args)
    return model.eval(), tokenizer


# -- perplexity --------------------------------------------------------------------------------------------------


def tokenize_documents(tokenizer, texts, progress=True):
    """As pretraining.py (medicalgpt.train.preprocess.prepare_pretraining_dataset): tokenizer(text) + EOS, per text."""
    if tokenizer.eos_token_id is None:
        raise UsageError("The tokenizer has no EOS token to end documents with.")
    documents = []
    for start in tqdm(range(0, len(texts), 1000), desc="Tokenising", unit="1000 docs", disable=not progress):
        ids = tokenizer(texts[start : start + 1000], add_special_tokens=True)["input_ids"]
        documents += [doc + [tokenizer.eos_token_id] for doc in ids]
    return documents


def perplexity_windows(length, window, stride):
    """[(begin, end, first)]: windows [begin, end) over `length` tokens, each scoring positions [first, end)."""
    windows, scored_to = [], 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        first = max(scored_to, begin + 1)
        if first < end:
            windows.append((begin, end, first))
        scored_to = end
        if end == length:
            break
    return windows


def run_perplexity(model, tokenizer, records, block_size, stride=None, batch_size=8, progress=True):
    """Perplexity of the documents as one stream -> (metrics, a row per document)."""
    stride = stride or block_size
    documents = tokenize_documents(tokenizer, [record["text"] for record in records], progress)
    stream = torch.tensor([token for doc in documents for token in doc], dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(documents)), torch.tensor([len(doc) for doc in documents]))
    windows = perplexity_windows(len(stream), block_size, stride)
    requests = [(stream[begin:end], first - begin) for begin, end, first in windows]
    found = span_logprobs(model, requests, pad_id_of(tokenizer), batch_size, "Scoring" if progress else None)
    nll, count = torch.zeros(len(documents), dtype=torch.float64), torch.zeros(len(documents), dtype=torch.long)
    for (_, end, first), logprobs in zip(windows, found):
        nll.index_add_(0, owner[first:end], -logprobs)
        count.index_add_(0, owner[first:end], torch.ones(end - first, dtype=torch.long))
    tokens = int(count.sum())
    if not tokens:
        raise UsageError("Too little text: no token has a token before it to be predicted from.")
    loss = nll.sum().item() / tokens
    metrics = {"perplexity": math.exp(min(loss, 50)), "loss": loss, "tokens": tokens, "documents": len(documents),
               "windows": len(windows), "block_size": block_size, "stride": stride}  # fmt: skip
    rows = [
        {"source": record.get("source"), "tokens": int(n), "loss": (s / n if n else None),
         "perplexity": (math.exp(min(s / n, 50)) if n else None)}
        for record, s, n in zip(records, nll.tolist(), count.tolist())
    ]  # fmt: skip
    return metrics, rows


# -- qa ----------------------------------------------------------------------------------------------------------


def check_qa_prompts(engine, items, max_new_tokens):
    errors = []
    for item in items:
        try:
            engine.check_length(len(engine.encode([{"role": "user", "content": item["question"]}])), max_new_tokens)
        except ValueError as error:
            path, line = item["source"].rsplit(":", 1)
            errors.append(Issue(path, int(line), "error", "question", str(error)))
    if errors:
        raise DataValidationError(errors)


def run_qa(engine, items, options, batch_size=8, progress=True):
    """Generate an answer per question and compare it with the reference -> (metrics, per-item rows)."""
    check_qa_prompts(engine, items, options.max_new_tokens)
    completions = []
    for start in tqdm(range(0, len(items), batch_size), desc="Generating", unit="batch", disable=not progress):
        batch = items[start : start + batch_size]
        completions += engine.generate([[{"role": "user", "content": item["question"]}] for item in batch], options)
    predictions = [completion.text.strip() for completion in completions]
    rouge, bleu, metrics = text_scores(predictions, [item["answer"] for item in items])
    truncated = sum(completion.finish_reason == "length" for completion in completions)
    metrics = {**metrics, "items": len(items), "truncated": truncated}
    rows = [
        {**item["record"], "source": item["source"], "prediction": prediction, "rouge_l": round(r, 2),
         "bleu": round(b, 2), "finish_reason": completion.finish_reason}
        for item, prediction, r, b, completion in zip(items, predictions, rouge, bleu, completions)
    ]  # fmt: skip
    return metrics, rows


# -- during training ---------------------------------------------------------------------------------------------


@dataclass
class ChoiceEvalArguments:
    """supervised_finetuning.py's flags for the choice task during training."""

    choice_eval_file: str | None = field(
        default=None,
        metadata={"help": "Exam questions (evaluate.py --task choice format) scored during training: "
                  "logs choice_accuracy (default: none)."},
    )  # fmt: skip
    choice_eval_steps: int = field(
        default=100, metadata={"help": "Score --choice_eval_file every N optimizer steps (0: only at the end)."}
    )
    choice_eval_n_shot: int = field(default=0, metadata={"help": "Solved examples before each question."})

    def __post_init__(self):
        if self.choice_eval_steps < 0 or self.choice_eval_n_shot < 0:
            raise ValueError("--choice_eval_steps and --choice_eval_n_shot must be at least 0")

    def load_items(self, skip_invalid=False):
        """The validated items of --choice_eval_file (path:line errors before any model loads), or None."""
        return (
            load_eval_items(self.choice_eval_file, "choice", skip_invalid=skip_invalid)
            if self.choice_eval_file
            else None
        )


class ChoiceEvalCallback(TrainerCallback):
    """Runs the choice task every `eval_steps` optimizer steps (and at the end of training) and logs
    `choice_accuracy` through the trainer (console, trainer_state.json, TensorBoard):

        items = load_eval_items("data/eval/choice.jsonl", "choice")
        trainer.add_callback(ChoiceEvalCallback(trainer, items, template, eval_steps=50))

    supervised_finetuning.py does this with `--choice_eval_file data/eval/choice.jsonl --choice_eval_steps 50`.

    Prompts are rendered with `template` (the SFT template), as `evaluate.py --task choice` renders them. Every rank
    scores every item (ZeRO-3 needs all ranks in each forward); rank 0 logs."""

    def __init__(self, trainer, items, template, eval_steps, n_shot=0, batch_size=8, system_prompt=None):
        self.trainer, self.items, self.template = trainer, items, template
        self.eval_steps, self.n_shot, self.batch_size = eval_steps, n_shot, batch_size
        self.system_prompt = system_prompt
        self.last_step, self.engine = None, None

    def evaluate(self, model, tokenizer, step):
        from medicalgpt.serve.chat import ChatEngine

        was_training = model.training
        if self.engine is None or self.engine.model is not model:  # ChatEngine() puts the model in eval mode
            self.engine = ChatEngine(model, tokenizer, self.template, system_prompt=self.system_prompt)
        try:
            metrics, _ = run_choice(
                model, tokenizer, self.items, self.engine.encode, self.n_shot, self.batch_size, False
            )
        finally:
            model.train(was_training)
        self.last_step = step
        self.trainer.log({"choice_accuracy": metrics["accuracy"]})
        return metrics

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.eval_steps and state.global_step % self.eval_steps == 0:
            self.evaluate(model, processing_class, state.global_step)

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if self.last_step != state.global_step:
            self.evaluate(model, processing_class, state.global_step)
