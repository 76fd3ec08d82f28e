"""ChatEngine.stream's answer as text pieces, for the terminal (inference.py): model.generate runs in a thread under
the engine's lock and a streamer hands the decoded text over. Leaving the loop early ends the generation at its
next token. The server and the web page stream through medicalgpt/serve/scheduler.py instead, which interleaves
generations."""

import threading

import torch
from transformers import StoppingCriteria, TextIteratorStreamer

from medicalgpt.serve.options import Completion, GenerationOptions, until_stop


class Cancelled(StoppingCriteria):
    """Stops every row once `event` is set: model.generate checks it after each token."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatStream:
    """Text pieces of one answer as they are generated. Leaving the loop early stops the generation."""

    def __init__(self, engine, ids, options: GenerationOptions):
        self.engine, self.ids, self.options = engine, ids, options
        self.completion = None
        self._cancel = threading.Event()
        self._result, self._error = None, None

    def cancel(self):
        self._cancel.set()

    def _work(self, streamer):
        engine = self.engine
        try:
            with engine._lock, torch.inference_mode():
                if self._cancel.is_set():
                    return
                input_ids, attention_mask = engine.left_pad([self.ids])
                self._result = engine.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    streamer=streamer,
                    stopping_criteria=[Cancelled(self._cancel)],
                    **engine.generation_kwargs(self.options),
                )[0, len(self.ids) :].tolist()
        except Exception as error:  # re-raised in the consumer's thread
            self._error = error
        finally:
            streamer.end()

    def __iter__(self):
        streamer = TextIteratorStreamer(self.engine.tokenizer, skip_prompt=True, skip_special_tokens=True)
        worker = threading.Thread(target=self._work, args=(streamer,), daemon=True)
        worker.start()
        text, hit = "", False
        try:
            for piece in until_stop(streamer, [*self.engine.stop_strings, *self.options.stop]):
                if piece is None:
                    hit = True
                    break
                text += piece
                yield piece
        finally:
            self._cancel.set()
        worker.join()
        if self._error is not None:
            raise self._error
        done = self.engine.completion_of(self._result or [], len(self.ids), self.options)
        finish = "stop" if hit else done.finish_reason
        self.completion = Completion(text, done.prompt_tokens, done.completion_tokens, finish)
