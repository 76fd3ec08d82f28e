"""ChatArguments: the model-loading options are ModelArguments' own fields; the flags stay as they were."""

import dataclasses
import typing

import pytest

from medicalgpt.args import ModelArguments
from medicalgpt.parser import parse_cli
from medicalgpt.serve.chat import ChatArguments

FLAGS = ["base_model", "lora_model", "tokenizer_path", "template_name", "system_prompt", "max_new_tokens",
         "temperature", "top_p", "repetition_penalty", "use_cpu", "torch_dtype", "load_in_4bit", "load_in_8bit",
         "resize_emb", "trust_remote_code", "model_type"]  # fmt: skip
SHARED = ("torch_dtype", "load_in_4bit", "load_in_8bit", "trust_remote_code")


def without_none(annotation):
    """`str | None` -> `str`: HfArgumentParser rewrites an Optional field's type in place once it parsed the
    dataclass (an SFT run earlier in the session does), so ModelArguments' may have lost its None."""
    kept = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return kept[0] if typing.get_args(annotation) and len(kept) == 1 else annotation


def test_the_flags_are_unchanged_and_the_loading_fields_are_model_arguments_own():
    assert sorted(f.name for f in dataclasses.fields(ChatArguments)) == sorted(FLAGS)
    model_fields = {f.name: f for f in dataclasses.fields(ModelArguments)}
    declared_here = set(ChatArguments.__dict__.get("__annotations__", {}))
    for name in SHARED:
        assert name not in declared_here, f"{name} is re-declared in ChatArguments"
        field = next(f for f in dataclasses.fields(ChatArguments) if f.name == name)
        assert without_none(field.type) == without_none(model_fields[name].type)
        assert field.default == model_fields[name].default


def test_the_cli_fills_the_model_arguments_of_the_base_model():
    (args,) = parse_cli((ChatArguments,), ["--base_model", "m", "--tokenizer_path", "t", "--torch_dtype", "bfloat16",
                                           "--load_in_8bit", "--trust_remote_code", "True", "--use_cpu"])  # fmt: skip
    model = args.model_arguments()
    assert (model.model_name_or_path, model.torch_dtype, model.load_in_8bit, model.load_in_4bit) == (
        "m", "bfloat16", True, False)  # fmt: skip
    assert model.trust_remote_code and model.device_map is None and args.tokenizer_path == "t"
    assert ChatArguments(base_model="m", use_cpu=True).model_arguments().torch_dtype == "float32"


@pytest.mark.parametrize(
    "flags, message",
    [(["--torch_dtype", "fp8"], "--torch_dtype must be one of auto, bfloat16, float16, float32"),
     (["--load_in_4bit", "--load_in_8bit"], "--load_in_4bit and --load_in_8bit exclude each other"),
     (["--temperature", "-1"], "--temperature must be >= 0")],
)  # fmt: skip
def test_bad_values_are_one_line_errors_naming_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit) as exited:
        parse_cli((ChatArguments,), ["--base_model", "m", *flags])
    assert exited.value.code == 2 and message in capsys.readouterr().err
