"""Conversation templates: how a chat is turned into the text a model is trained on and prompted with.

Two APIs over the same templates:

* MedicalGPT's pair API: ``get_conv_template(name).get_prompt([[user, assistant], ...], system_prompt)``; an empty
  (or None) last answer leaves the prompt ready for the model to answer.
* A role API for training: ``render_turns(messages, system_prompt, tools)`` takes ``{"role", "content"}`` messages
  (roles ``user``, ``assistant``, ``function_call``, ``observation``) and returns one ``(prompt, response)`` pair per
  exchange. ``response`` is exactly what the model must learn: the answer and the end-of-turn ``stop_str``.

``system_prompt=None`` uses the template's default; ``""`` renders no system block, except in templates whose
official rendering always has one (``qwen``: an empty ``<|im_start|>system`` block, as Qwen2.5's own template
renders an empty system message). Contents are inserted verbatim (no ``str.format``); only ``llama3`` trims them,
as Meta's template does.

Tools use one format for every template, the one Qwen2.5/Qwen3 were trained on (so ``qwen`` and ``qwen3`` match
their official templates exactly):

* ``tools`` (a JSON list of function schemas) is appended to the system prompt: a ``# Tools`` section listing one
  schema per line inside ``<tools></tools>``, then the instruction to answer with ``<tool_call>`` blocks.
* a ``function_call`` message (content ``{"name": ..., "arguments": ...}``, or a list of them) is the assistant
  answer ``<tool_call>\\n{"name": "NAME", "arguments": {...}}\\n</tool_call>``, one block per call joined by "\\n".
* an ``observation`` message is the user turn ``<tool_response>\\nCONTENT\\n</tool_response>``.

BOS-like prefixes that the tokenizer adds itself (``<s>``, ``<|begin_of_text|>``, chatglm3's ``[gMASK]sop``) are not
part of the rendered text.
"""

from medicalgpt.templates import builtin  # noqa: F401  (registers the built-in templates)
from medicalgpt.templates.conversation import (
    Conversation,
    ConversationTemplate,
    conv_templates,
    get_conv_template,
    register_conv_template,
)
from medicalgpt.templates.tokenizer import (
    TokenizerTemplate,
    build_template,
    encode_texts,
    leading_bos,
    retokenizable_texts,
    template_from_tokenizer,
)

__all__ = [
    "ConversationTemplate",
    "Conversation",
    "TokenizerTemplate",
    "conv_templates",
    "get_conv_template",
    "register_conv_template",
    "template_from_tokenizer",
    "build_template",
    "leading_bos",
    "retokenizable_texts",
    "encode_texts",
]
