import pytest
from transformers import TrainingArguments
from trl import SFTConfig

from medicalgpt.args import DataArguments, LoraArguments, ModelArguments, PretrainingArguments, SupervisedArguments
from medicalgpt.parser import parse_args

PT_TYPES = (TrainingArguments, ModelArguments, DataArguments, LoraArguments, PretrainingArguments)


def test_tutorial_flags_dropped_by_transformers_5_keep_their_meaning(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--warmup_ratio", "0.05", "--group_by_length", "True"]
    argv += ["--overwrite_output_dir", "--torch_dtype", "bfloat16", "--flash_attn", "True", "--device_map", "auto"]
    argv += ["--no_cuda", "--block_size", "512", "--target_modules", "all", "--use_peft", "True"]
    training, model, data, lora, pt = parse_args(*PT_TYPES, argv=argv)
    assert training.warmup_steps == 0.05
    assert training.train_sampling_strategy == "group_by_length"
    assert training.overwrite_output_dir is True
    assert training.use_cpu is True
    assert (model.torch_dtype, model.flash_attn, model.device_map) == ("bfloat16", True, "auto")
    assert (pt.block_size, lora.target_modules, lora.use_peft) == (512, "all", True)


def test_unknown_flag_is_rejected_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(*PT_TYPES, argv=["--output_dir", str(tmp_path), "--lora_rnak", "8"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --lora_rnak 8" in capsys.readouterr().err


def test_invalid_value_is_a_clean_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(*PT_TYPES, argv=["--output_dir", str(tmp_path), "--torch_dtype", "float64"])
    assert "--torch_dtype must be one of auto, bfloat16, float16, float32" in capsys.readouterr().err


def test_config_file_with_command_line_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"output_dir: {tmp_path}\nlearning_rate: 0.001\nlora_rank: 4\nuse_peft: true\nmodel_max_length: 256\n"
        "gradient_checkpointing_kwargs: {use_reentrant: false}\n"
    )
    training, model, data, lora, sft = parse_args(
        SFTConfig, ModelArguments, DataArguments, LoraArguments, SupervisedArguments,
        argv=[str(config), "--lora_rank", "16"],
    )  # fmt: skip
    assert training.learning_rate == 0.001
    assert training.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert (lora.lora_rank, lora.use_peft, sft.model_max_length) == (16, True, 256)


def test_config_file_unknown_key_fails(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text('{"output_dir": "x", "learning_rat": 0.1}')
    with pytest.raises(SystemExit):
        parse_args(*PT_TYPES, argv=[str(config)])
    assert "unrecognized arguments: --learning_rat 0.1" in capsys.readouterr().err


def test_field_shared_with_trl_config_is_parsed_once(tmp_path):
    training, model, *_ = parse_args(
        SFTConfig, ModelArguments, DataArguments, LoraArguments, SupervisedArguments,
        argv=["--output_dir", str(tmp_path), "--trust_remote_code", "True"],
    )  # fmt: skip
    assert training.trust_remote_code is True and model.trust_remote_code is True


def test_trust_remote_code_is_off_by_default(tmp_path):
    training, model, *_ = parse_args(*PT_TYPES, argv=["--output_dir", str(tmp_path)])
    assert model.trust_remote_code is False


def test_bare_bool_flag_works_for_trl_optional_bools(tmp_path):
    training, *_ = parse_args(
        SFTConfig, ModelArguments, DataArguments, LoraArguments, SupervisedArguments,
        argv=["--output_dir", str(tmp_path), "--bf16", "--use_peft", "True"],
    )  # fmt: skip
    assert training.bf16 is True


def test_upstream_aliases_set_the_options_they_name(tmp_path):
    from trl.experimental.orpo import ORPOConfig

    from medicalgpt.args import OrpoArguments, PreferenceArguments

    argv = ["--output_dir", str(tmp_path), "--orpo_beta", "1.0", "--qlora", "True", "--flash_attn", "True"]
    training, model, data, lora, pref, orpo = parse_args(
        ORPOConfig, ModelArguments, DataArguments, LoraArguments, PreferenceArguments, OrpoArguments, argv=argv
    )
    assert (training.beta, orpo.orpo_beta) == (1.0, 1.0)
    assert (model.load_in_4bit, lora.use_peft) == (True, True)
    assert model.attn_implementation == "flash_attention_2"
    assert training.max_length == 1024 + 512  # --max_source_length + --max_target_length


def test_explicit_attention_kernel_wins_over_flash_attn(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--flash_attn", "True", "--attn_implementation", "eager"]
    _, model, *_ = parse_args(*PT_TYPES, argv=argv)
    assert model.attn_implementation == "eager"


def test_continuing_an_adapter_is_lora_training(tmp_path):
    _, _, _, lora, _ = parse_args(*PT_TYPES, argv=["--output_dir", str(tmp_path), "--peft_path", "adapter"])
    assert lora.use_peft is True


def test_sft_lengths_and_workers_follow_upstream_names(tmp_path):
    types = (SFTConfig, ModelArguments, DataArguments, LoraArguments, SupervisedArguments)
    argv = ["--output_dir", str(tmp_path), "--model_max_length", "256", "--preprocessing_num_workers", "3"]
    training, _, _, _, sft = parse_args(*types, argv=argv)
    assert (training.max_length, sft.model_max_length, training.dataset_num_proc) == (256, 256, 3)
    training, _, _, _, sft = parse_args(*types, argv=["--output_dir", str(tmp_path), "--max_length", "300"])
    assert (training.max_length, sft.model_max_length) == (300, 300)


def test_preference_length_is_prompt_plus_answer(tmp_path):
    from trl import DPOConfig

    from medicalgpt.args import PreferenceArguments

    argv = ["--output_dir", str(tmp_path), "--max_source_length", "100", "--max_target_length", "20"]
    training, *_ = parse_args(DPOConfig, ModelArguments, DataArguments, PreferenceArguments, argv=argv)
    assert training.max_length == 120


def test_gradient_checkpointing_is_non_reentrant_unless_told(tmp_path):
    argv = ["--output_dir", str(tmp_path), "--gradient_checkpointing", "True"]
    training, *_ = parse_args(*PT_TYPES, argv=argv)
    assert training.gradient_checkpointing_kwargs == {"use_reentrant": False}
    argv += ["--gradient_checkpointing_kwargs", '{"use_reentrant": true}']
    training, *_ = parse_args(*PT_TYPES, argv=argv)
    assert training.gradient_checkpointing_kwargs == {"use_reentrant": True}
