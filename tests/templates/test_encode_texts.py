"""encode_texts: the ids of tokenizer(texts), taken from the Rust backend directly where that gives the same ids."""

import copy

import pytest

from medicalgpt.templates import encode_texts, get_conv_template
from medicalgpt.templates.tokenizer import plain_backend
from tests.helpers import QA_PAIRS

TEXTS = [
    "",
    "发烧三天，体温38.5度，该怎么办？",
    "Take paracetamol every 6 hours.\n\n  Drink water. ",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    *[text for question, answer in QA_PAIRS for text in get_conv_template("qwen").get_dialog([[question, answer]])],
]


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_the_backend_path_gives_the_ids_of_the_ordinary_call(tiny_tokenizer, add_special_tokens):
    assert plain_backend(tiny_tokenizer) is not None  # the tiny tokenizer takes the fast path tested here
    expected = tiny_tokenizer(TEXTS, add_special_tokens=add_special_tokens)["input_ids"]
    assert encode_texts(tiny_tokenizer, TEXTS, add_special_tokens=add_special_tokens) == expected
    assert encode_texts(tiny_tokenizer, []) == []


def test_a_backend_left_truncating_takes_the_ordinary_call_which_does_not_truncate(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.backend_tokenizer.enable_truncation(max_length=3)
    assert plain_backend(tokenizer) is None
    assert encode_texts(tokenizer, TEXTS) == tiny_tokenizer(TEXTS, add_special_tokens=False)["input_ids"]
    assert max(len(ids) for ids in encode_texts(tokenizer, TEXTS)) > 3


def test_split_special_tokens_is_honoured(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.split_special_tokens = True  # "<|im_start|>" is then text, not its special id
    ids = encode_texts(tokenizer, TEXTS[3:4])
    assert ids == tokenizer(TEXTS[3:4], add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in ids[0]
