"""What a generation is asked for and what it gives back, shared by the chat engine, its streams and the server's
scheduler: sampling options, a prompt with tools, a completion, and the stop-string rules."""

from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 512
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # extra stop strings; the answer ends before the first one


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation with tools offered to the model (rendered into the system prompt by the template) and the text
    the answer is made to start with (appended to the prompt; the completion is the text after it)."""

    messages: list
    tools: list | None = None
    answer_prefix: str = ""


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop": end of turn or a stop string; "length": max_new_tokens reached


class PromptTooLongError(ValueError):
    """The prompt plus max_new_tokens does not fit the model's context."""


def cut_at_stop(text, stops):
    """(text before the first stop string, whether one was found)."""
    positions = [text.find(stop) for stop in stops if stop and stop in text]
    return (text[: min(positions)], True) if positions else (text, False)


def held_back(text, stops):
    """How many characters at the end of `text` may be the beginning of a stop string (not to be shown yet)."""
    return max((n for stop in stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)


def until_stop(pieces, stops):
    """Yield text pieces up to the first stop string, then None. Text that may begin a stop string is held back."""
    buffer = ""
    for piece in pieces:
        buffer, (before, hit) = buffer + piece, cut_at_stop(buffer + piece, stops)
        if hit:
            if before:
                yield before
            yield None
            return
        keep = held_back(buffer, stops)
        if len(buffer) > keep:
            yield buffer[: len(buffer) - keep]
            buffer = buffer[len(buffer) - keep :]
    if buffer:
        yield buffer
