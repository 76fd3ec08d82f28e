"""The three tasks of evaluate.py, and ChoiceEvalCallback, which runs the choice task while SFT trains.

choice      Each candidate answer is scored by the log-likelihood the model gives its letter(s) right after the
            prompt (the chat template's generation prompt, or `答案：` / `Answer:` in plain format), and the most
            likely candidate is the prediction. A single-answer item's candidates are its option letters; a k-answer
            item's are every set of k letters, written in alphabetical order as in the file ("ACD"): the score of
            "ACD" is that of its tokens in sequence, so a model is right only when it picks the whole set. The
            expected accuracy of guessing (`chance`) is reported beside the accuracy.
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

import collections
import inspect
import itertools
import logging
import math
from dataclasses import dataclass, field

import torch
from tqdm import tqdm
from transformers import TrainerCallback

from medicalgpt.cli import UsageError
from medicalgpt.data.validate import DataValidationError, Issue
from medicalgpt.eval.items import answer_cue, choice_conversation, choice_text, load_eval_items, pick_shots
from medicalgpt.eval.text_metrics import text_scores
from medicalgpt.templates import leading_bos

logger = logging.getLogger(__name__)


def load_scoring_model(chat_args):
    """(model, tokenizer) of --base_model (+ --lora_model, merged), as load_chat_engine loads them, with no
    conversation template needed (perplexity and plain-format prompts work on base models without one)."""
    from medicalgpt.modeling import load_model, load_model_with_adapter, load_tokenizer, read_adapter_base
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


def context_length(model, tokenizer):
    return getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length


def pad_id_of(tokenizer):
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# -- scoring token sequences -------------------------------------------------------------------------------------


def _logits(model, sequences, pad_id, keep):
    """Logits at the last `keep` positions of left-padded `sequences` (position ids restart at each row's first
    real token). Models that take `logits_to_keep` never build the [batch, tokens, vocab] logits of the rest."""
    width = max(len(ids) for ids in sequences)
    rows = [torch.as_tensor(ids, dtype=torch.long) for ids in sequences]
    input_ids = torch.stack([torch.cat([torch.full((width - len(r),), pad_id), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]).long() for r in rows])
    kwargs = dict(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    kwargs = {key: value.to(model.device) for key, value in kwargs.items()}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" in inspect.signature(base.forward).parameters:
        kwargs["logits_to_keep"] = keep
    return model(**kwargs, use_cache=False).logits[:, -keep:]


def _batches(lengths, batch_size):
    """Indices in batches of similar lengths (longest first: an out-of-memory error comes at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def next_token_logprobs(model, prompts, targets, pad_id, batch_size=8, desc=None):
    """log p(token | prompt) for each token id of targets[i] after prompts[i]; one forward per prompt."""
    results = [None] * len(prompts)
    for batch in tqdm(_batches([len(p) for p in prompts], batch_size), desc=desc, unit="batch", disable=not desc):
        logprobs = torch.log_softmax(_logits(model, [prompts[i] for i in batch], pad_id, 1)[:, 0].float(), -1)
        for row, i in enumerate(batch):
            results[i] = logprobs[row, targets[i]].tolist()
    return results


@torch.inference_mode()
def span_logprobs(model, requests, pad_id, batch_size=8, desc=None):
    """requests: [(ids, start)] -> per request, a float64 tensor of log p(ids[t] | ids[:t]) for start <= t < len."""
    results = [None] * len(requests)
    for batch in tqdm(_batches([len(r[0]) for r in requests], batch_size), desc=desc, unit="batch", disable=not desc):
        keep = max(len(requests[i][0]) - requests[i][1] for i in batch) + 1  # rows end together (left padding)
        logits = _logits(model, [requests[i][0] for i in batch], pad_id, keep)
        for row, i in enumerate(batch):
            ids, start = torch.as_tensor(requests[i][0], dtype=torch.long), requests[i][1]
            scored = len(ids) - start  # predicted by the logits at the `scored` positions before the last
            scores = torch.log_softmax(logits[row, keep - 1 - scored : keep - 1].float(), -1)
            results[i] = scores.gather(-1, ids[start:, None].to(scores.device))[:, 0].double().cpu()
    return results


# -- choice ------------------------------------------------------------------------------------------------------


def candidates_of(item):
    """Single answer: the option letters; k answers: every k-letter set, letters in alphabetical order."""
    return ["".join(c) for c in itertools.combinations(item["options"], len(item["answer"]))]


def encode_choice(item, shots, tokenizer, encode=None):
    """(prompt ids, {candidate: continuation ids}). `encode` (ChatEngine.encode) for chat prompts, None for plain."""
    if encode is not None:
        prompt = encode(choice_conversation(item, shots))
        return prompt, {c: tokenizer.encode(c, add_special_tokens=False) for c in candidates_of(item)}
    text, space = choice_text(item, shots), answer_cue(item)[1]
    bos = leading_bos(tokenizer, text)
    prompt = bos + tokenizer.encode(text, add_special_tokens=False)
    continuations = {}
    for candidate in candidates_of(item):
        whole = bos + tokenizer.encode(text + space + candidate, add_special_tokens=False)
        prefix_kept = whole[: len(prompt)] == prompt
        continuations[candidate] = (
            whole[len(prompt) :] if prefix_kept else tokenizer.encode(space + candidate, add_special_tokens=False)
        )  # a merge across the cue ("：A" as one token): the letters tokenised on their own
    return prompt, continuations


def build_choice_prompts(items, tokenizer, encode, n_shot, max_length):
    """Per item (prompt ids, continuations, shots used); shots are dropped while the prompt is too long. An item
    that does not fit even zero-shot is a path:line error."""
    prompts, errors = [], []
    for index, item in enumerate(items):
        shots = pick_shots(items, index, n_shot)
        while True:
            prompt, continuations = encode_choice(item, shots, tokenizer, encode)
            longest = len(prompt) + max(len(ids) for ids in continuations.values())
            if longest <= max_length or not shots:
                break
            shots = shots[:-1]
        if longest > max_length:
            path, line = item["source"].rsplit(":", 1)
            message = f"the prompt ({longest} tokens) exceeds the model's context of {max_length} tokens"
            errors.append(Issue(path, int(line), "error", "question", message))
        prompts.append((prompt, continuations, len(shots)))
    if errors:
        raise DataValidationError(errors)
    if n_shot and any(used < n_shot for _, _, used in prompts):
        logger.warning("Fewer than %d shots for some items (file too small, or prompts too long).", n_shot)
    return prompts


def score_choices(model, prompts, pad_id, batch_size=8, desc=None):
    """[{candidate: log-likelihood}] per prompt: one forward per prompt when every candidate is one token, one
    per candidate otherwise."""
    single = [i for i, (_, conts, _) in enumerate(prompts) if all(len(ids) == 1 for ids in conts.values())]
    targets = [[ids[0] for ids in prompts[i][1].values()] for i in single]
    scores = [None] * len(prompts)
    found = next_token_logprobs(model, [prompts[i][0] for i in single], targets, pad_id, batch_size, desc)
    for i, values in zip(single, found):
        scores[i] = dict(zip(prompts[i][1], values))
    rest = [(i, candidate) for i in range(len(prompts)) if scores[i] is None for candidate in prompts[i][1]]
    requests = [(prompts[i][0] + prompts[i][1][candidate], len(prompts[i][0])) for i, candidate in rest]
    found = span_logprobs(model, requests, pad_id, batch_size, desc and f"{desc} (multi-token)") if rest else []
    for (i, candidate), values in zip(rest, found):
        scores[i] = {**(scores[i] or {}), candidate: values.sum().item()}
    return scores


def run_choice(model, tokenizer, items, encode=None, n_shot=0, batch_size=8, progress=True):
    """Accuracy overall and per subject -> (metrics, per-item rows)."""
    was_training = model.training
    model.eval()
    prompts = build_choice_prompts(items, tokenizer, encode, n_shot, context_length(model, tokenizer))
    try:
        scores = score_choices(model, prompts, pad_id_of(tokenizer), batch_size, "Scoring" if progress else None)
    finally:
        model.train(was_training)
    rows, subjects = [], collections.defaultdict(list)
    for item, item_scores, (_, _, shots) in zip(items, scores, prompts):
        prediction = max(item_scores, key=item_scores.get)
        correct = prediction == item["answer"]
        subjects[item["subject"] or "(no subject)"].append(correct)
        rounded = {candidate: round(score, 4) for candidate, score in item_scores.items()}
        rows.append({**item["record"], "source": item["source"], "prediction": prediction, "correct": correct,
                     "scores": rounded, "shots": shots})  # fmt: skip
    right = sum(row["correct"] for row in rows)
    metrics = {
        "accuracy": right / len(rows),
        "correct": right,
        "items": len(rows),
        "chance": sum(1 / len(item_scores) for item_scores in scores) / len(rows),
        "subjects": {name: {"items": len(v), "accuracy": sum(v) / len(v)} for name, v in sorted(subjects.items())},
    }
    return metrics, rows


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
