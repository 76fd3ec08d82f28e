"""A batch of prompts decoded one step at a time with its own KV cache, so that one worker can interleave several
generations (medicalgpt/serve/scheduler.py): a short request advances while a long one is still going.

    decoding = Decoding(engine, [prompt_ids, ...], options)
    while not decoding.finished:
        for row, piece in decoding.step(): ...      # the text each row added (held back while a stop may begin)
    decoding.completion(row)                         # text, token counts, finish_reason

Each step is one chunk of the prompts (prefill, `prefill_chunk` tokens, so a long prompt does not hold the worker
for long) or one new token for every row still going. The sampling is model.generate's for the same options: the
repetition penalty, then temperature and top-p (no top-k) with multinomial sampling, or greedy at temperature 0.
A row ends at an end-of-turn token (counted, not shown), a stop string (the text ends before it), max_new_tokens,
or when dropped (its client left).
"""

import inspect

import torch
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from medicalgpt.serve.options import Completion, GenerationOptions, cut_at_stop, held_back

INCOMPLETE = "\ufffd"  # what a decoded text ends with while a character's bytes are still arriving


def logits_processors(options: GenerationOptions):
    """The processors model.generate applies for these options (ChatEngine.generation_kwargs)."""
    processors = LogitsProcessorList()
    if options.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
    if options.temperature > 0:
        if options.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(options.temperature))
        if options.top_p < 1.0:
            processors.append(TopPLogitsWarper(options.top_p))
    return processors


class RowText:
    """The answer of one row as tokens arrive: the text shown so far and why it ended."""

    def __init__(self, engine, options: GenerationOptions):
        self.engine, self.options = engine, options
        self.stops = [*engine.stop_strings, *options.stop]
        self.tokens, self.count, self.shown, self.finish = [], 0, "", None

    def add(self, token):
        """Take one generated token; the text it adds to what is shown ("" while held back)."""
        self.count += 1
        if token in self.engine.stop_ids:
            self.finish = "stop"
        else:
            self.tokens.append(token)
        if self.finish is None and self.count >= self.options.max_new_tokens:
            self.finish = "length"
        with self.engine._tokenizer_lock:
            text = self.engine.tokenizer.decode(self.tokens, skip_special_tokens=True)
        before, hit = cut_at_stop(text, self.stops)
        if hit:
            self.finish, text = "stop", before
        elif self.finish is None:
            if text.endswith(INCOMPLETE):
                return ""
            text = text[: len(text) - held_back(text, self.stops)]
        piece = text[len(self.shown) :] if text.startswith(self.shown) else ""
        self.shown = text if len(text) >= len(self.shown) else self.shown
        return piece


class Decoding:
    """Prompts decoded together (left-padded, one KV cache); step() advances every row still going by one token."""

    def __init__(self, engine, prompts, options: GenerationOptions, prefill_chunk=256):
        self.engine, self.options, self.prefill_chunk = engine, options, prefill_chunk
        self.prompt_tokens = [len(ids) for ids in prompts]
        self.sequences, self.mask = engine.left_pad(prompts)  # prompt + generated ids; attention mask over them
        self.prompt_width, self.prefilled = self.sequences.shape[1], 0
        self.cache = DynamicCache(config=engine.model.config)
        self.processors = logits_processors(options)
        self.rows = [RowText(engine, options) for _ in prompts]
        self.dropped = [False] * len(prompts)
        # Only the last position's logits are needed; a model whose forward predates logits_to_keep computes them all
        # (a prefill chunk's worth). A forward taking **kwargs (a peft wrapper) hands it on to the model.
        forward = inspect.signature(engine.model.forward).parameters.values()
        takes = any(p.name == "logits_to_keep" or p.kind is inspect.Parameter.VAR_KEYWORD for p in forward)
        self.last_only = {"logits_to_keep": 1} if takes else {}

    def live(self, row):
        return self.rows[row].finish is None and not self.dropped[row]

    @property
    def finished(self):
        return not any(self.live(row) for row in range(len(self.rows)))

    def drop(self, row):
        """Stop generating for `row` (its client left); the others go on."""
        self.dropped[row] = True

    def completion(self, row):
        text = self.rows[row]
        return Completion(text.shown, self.prompt_tokens[row], text.count, text.finish or "length")

    @torch.inference_mode()
    def step(self):
        """One prefill chunk or one token per live row: [(row, text it added)] for the rows that took a token."""
        if self.prefilled < self.prompt_width:
            start, self.prefilled = self.prefilled, min(self.prompt_width, self.prefilled + self.prefill_chunk)
            logits = self._forward(self.sequences[:, start : self.prefilled], self.mask[:, : self.prefilled])
            if self.prefilled < self.prompt_width:
                return []
        else:
            logits = self._forward(self.sequences[:, -1:], self.mask)
        return self._choose(logits[:, -1, :].float())

    def _forward(self, input_ids, attention_mask):
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        output = self.engine.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            **self.last_only,
        )
        return output.logits

    def _choose(self, scores):
        scores = self.processors(self.sequences, scores)
        if self.options.temperature > 0:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        live = [self.live(row) for row in range(len(self.rows))]
        tokens = torch.where(torch.tensor(live, device=tokens.device), tokens, self.engine.pad_id)
        self.sequences = torch.cat([self.sequences, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return [(row, self.rows[row].add(token)) for row, token in enumerate(tokens.tolist()) if live[row]]
