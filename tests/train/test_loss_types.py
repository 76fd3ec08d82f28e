"""The preference and RL loss families as supported features: IPO (dpo_training.py) and SimPO (cpo_training.py)
shown to learn a preference the model did not have, and the combinations that cannot work refused in one line
before anything loads."""

import pytest

import cpo_training
import dpo_training
import kto_training
import ppo_training
from medicalgpt.cli import UsageError
from medicalgpt.loss_types import CPO_LOSSES, DPO_LOSSES, GRPO_LOSSES, KTO_LOSSES
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
    ("simpo", cpo_training.main,
     ["--loss_type", "simpo", "--beta", "2.0", "--simpo_gamma", "1.0", "--cpo_alpha", "0"]),
])  # fmt: skip
def test_loss_raises_the_held_out_chosen_minus_rejected_margin(name, main, extra, tiny_model_dir, tiny_tokenizer,
                                                               doctor_data, tmp_path):  # fmt: skip
    train, held_out = doctor_data
    main(preference_argv(tiny_model_dir, train, tmp_path / name, *extra))
    before = logprob_margin(tiny_model_dir, held_out, tiny_tokenizer)
    after = logprob_margin(tmp_path / name, held_out, tiny_tokenizer)
    print(f"{name}: held-out log-prob margin {before:.2f} -> {after:.2f}")
    assert after > before + 3.0, (before, after)


GRPO = ["--rl_algorithm", "grpo", "--reward_funcs", "choice_accuracy"]
REFUSED = [  # (script, flags, the one-line error)
    ("dpo", ["--loss_type", "robust"], r"--loss_type robust needs --label_smoothing in \(0, 0.5\)"),
    ("dpo", ["--label_smoothing", "0.1"], "--label_smoothing is read only by the robust, exo_pair, .* sigmoid would"),
    ("dpo", ["--loss_type", "exo_pair"], "--loss_type exo_pair needs --label_smoothing above 0"),
    ("dpo", ["--loss_type", "aot_unpaired", "--per_device_train_batch_size", "1"],
     "--loss_type aot_unpaired sorts the margins within each batch"),
    ("dpo", ["--loss_type", "sft"], "--loss_type sft alone is supervised fine-tuning"),
    ("dpo", ["--loss_type", "simpo"], "--loss_type simpo: unknown; expected one of sigmoid, ipo,"),
    ("dpo", ["--loss_type", "hinge", "--f_divergence_type", "js_divergence", "--loss_type", "bco_pair"],
     "--f_divergence_type js_divergence works only with"),
    ("cpo", ["--loss_type", "sigmoid", "--simpo_gamma", "0.5"], "--simpo_gamma is SimPO's target margin"),
    ("cpo", ["--loss_type", "hinge", "--label_smoothing", "0.1"], "--label_smoothing is read only by the sigmoid"),
    ("kto", ["--per_device_train_batch_size", "1"], "--loss_type kto estimates its KL term from the other answers"),
    ("kto", ["--train_sampling_strategy", "random"], "needs --train_sampling_strategy sequential"),
    ("kto", ["--undesirable_weight", "0"], "--desirable_weight and --undesirable_weight must be above 0"),
    ("grpo", ["--loss_type", "dr_grpo"], "Dr. GRPO also drops the per-group std scaling"),
    ("grpo", ["--loss_type", "luspo"], "luspo is a sequence-level loss: it needs --importance_sampling_level seq"),
    ("grpo", ["--loss_type", "vespo", "--importance_sampling_level", "sequence"], "keep --importance_sampling_level"),
    ("grpo", ["--loss_type", "cispo"], "cispo caps the importance weights at --epsilon_high: .* unset it is"),
    ("grpo", ["--loss_type", "cispo", "--epsilon_high", "0.28"], "0.28 would clip every token"),
    ("grpo", ["--epsilon_high", "0.1"], r"--epsilon_high 0.1 is below --epsilon 0.2: clip-higher \(DAPO\)"),
    ("grpo", ["--delta", "1.1"], r"--delta 1.1 must be above 1 \+ the upper clip range \(1.2\)"),
    ("grpo", ["--importance_sampling_level", "sentence"], "must be token or sequence"),
    ("dpo", ["--loss_type", "robust", "--label_smoothing", "0.7"], r"in \(0, 0.5\): .*, got 0.7$"),
    ("dpo", ["--beta", "0"], "--beta must be above 0 .*, got 0.0"),
    ("dpo", ["--loss_type", "ipo", "--beta", "-0.1"], "--beta must be above 0 .*, got -0.1"),
    ("dpo", ["--loss_type", "sigmoid", "sigmoid"], "--loss_type sigmoid sigmoid: a loss named twice"),
    ("cpo", ["--loss_type", "simpo", "--beta", "0"], "--beta must be above 0"),
    ("cpo", ["--loss_type", "simpo", "--cpo_alpha", "-1"], "--cpo_alpha weighs .* must be 0 or more, got -1.0"),
    ("kto", ["--beta", "-1"], "--beta must be above 0"),
]  # fmt: skip
MAINS = {"dpo": dpo_training.main, "cpo": cpo_training.main, "kto": kto_training.main, "grpo": ppo_training.main}


@pytest.mark.parametrize(("script", "flags", "message"), REFUSED)
def test_a_loss_type_that_cannot_work_is_refused_in_one_line_before_anything_loads(script, flags, message, tmp_path):
    out = tmp_path / "out"
    argv = ["--model_name_or_path", "no-such-model", "--output_dir", str(out), "--do_train", *flags]
    with pytest.raises(UsageError, match=message) as error:
        MAINS[script]((GRPO if script == "grpo" else []) + argv)
    assert "\n" not in str(error.value)
    assert not out.exists()


@pytest.mark.parametrize(("script", "flags"), [
    ("dpo", ["--loss_type", "robust", "--label_smoothing", "0.1"]),
    ("dpo", ["--loss_type", "sigmoid", "sft", "--loss_weights", "1", "0.2"]),
    ("cpo", ["--loss_type", "simpo", "--simpo_gamma", "0.5", "--label_smoothing", "0.1"]),
    ("kto", ["--loss_type", "apo_zero_unpaired", "--per_device_train_batch_size", "1"]),
    ("grpo", ["--loss_type", "dr_grpo", "--scale_rewards", "none", "--importance_sampling_level", "sequence"]),
    ("grpo", ["--loss_type", "dapo", "--epsilon_high", "0.28", "--mask_truncated_completions", "True"]),
    ("grpo", ["--loss_type", "cispo", "--epsilon_high", "5.0"]),
])  # fmt: skip
def test_the_combinations_each_method_documents_get_past_the_check(script, flags, tmp_path):
    """They fail later, at the missing model: the loss options themselves were accepted."""
    from medicalgpt.errors import ModelPathError

    argv = ["--model_name_or_path", str(tmp_path / "no-such-model"), "--output_dir", str(tmp_path / "out"),
            "--train_file_dir", str(REPO / "data" / ("grpo" if script == "grpo" else "reward")), *flags]  # fmt: skip
    with pytest.raises((ModelPathError, OSError)):
        MAINS[script]((GRPO if script == "grpo" else []) + argv)


@pytest.mark.parametrize(("main", "argv", "losses"), [
    (dpo_training.main, ["--help"], DPO_LOSSES),
    (cpo_training.main, ["--help"], CPO_LOSSES),
    (kto_training.main, ["--help"], KTO_LOSSES),
    (ppo_training.main, ["--help"], GRPO_LOSSES),
    (ppo_training.main, ["--rl_algorithm", "grpo", "--help"], GRPO_LOSSES),
])  # fmt: skip
def test_help_tables_every_loss_type_with_what_it_needs(main, argv, losses, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    text = capsys.readouterr().out
    rows = {line.split()[0]: line for line in text.split("Loss types, ", 1)[1].splitlines()[2:] if line.strip()}
    assert set(losses) <= set(rows)
    for name, (needs, _) in losses.items():
        assert (needs or "-") in rows[name]
