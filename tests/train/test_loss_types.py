"""The preference and RL loss families as supported features: IPO (dpo_training.py) and SimPO (cpo_training.py)
shown to learn a preference the model did not have, and the combinations that cannot work refused in one line
before anything loads."""

import pytest

import cpo_training
import dpo_training
import ppo_training
from medicalgpt.cli import UsageError
from medicalgpt.loss_types import DPO_LOSSES, GRPO_LOSSES, loss_table
from tests.helpers import FAST_FLAGS, REPO, logprob_margin, write_doctor_data


@pytest.fixture(scope="module")
def doctor_data(tmp_path_factory):
    return write_doctor_data(tmp_path_factory.mktemp("doctor"))


def preference_argv(model_dir, train, out, *extra):
    return ["--model_name_or_path", model_dir, "--train_file_dir", str(train), "--do_train", "--template_name",
            "qwen", "--use_peft", "True", "--lora_rank", "16", "--learning_rate", "5e-3", "--num_train_epochs", "3",
            "--per_device_train_batch_size", "8", "--output_dir", str(out), "--save_strategy", "no",
            "--logging_steps", "5", *FAST_FLAGS, *extra]  # fmt: skip


@pytest.mark.parametrize(("name", "main", "extra"), [
    ("ipo", dpo_training.main, ["--loss_type", "ipo", "--beta", "0.1"]),
    ("simpo", cpo_training.main, ["--loss_type", "simpo", "--beta", "2.0", "--simpo_gamma", "1.0", "--cpo_alpha", "0"]),
])  # fmt: skip
def test_loss_raises_the_held_out_chosen_minus_rejected_margin(name, main, extra, tiny_model_dir, tiny_tokenizer,
                                                               doctor_data, tmp_path):  # fmt: skip
    train, held_out = doctor_data
    main(preference_argv(tiny_model_dir, train, tmp_path / name, *extra))
    before = logprob_margin(tiny_model_dir, held_out, tiny_tokenizer)
    after = logprob_margin(tmp_path / name, held_out, tiny_tokenizer)
    print(f"{name}: held-out log-prob margin {before:.2f} -> {after:.2f}")
    assert after > before + 3.0, (before, after)
