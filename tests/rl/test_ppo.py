"""PPO: the math on hand-computed numbers, learning on a tiny policy, the tutorial's command, torchrun, resume,
and trl's RLOO / GRPO with the same reward model."""

import json
import math
import sys

import pytest
import torch

import ppo_training
import reward_modeling
import supervised_finetuning
from medicalgpt.args import ModelArguments
from medicalgpt.model.loader import load_model, load_tokenizer
from medicalgpt.rl import build
from medicalgpt.rl import ppo_math as ppo
from medicalgpt.rl.ppo_loss import policy_loss, value_loss
from tests.helpers import FAST_FLAGS, REPO, run, write_jsonl


def test_gae_on_hand_computed_numbers():
    rewards, values = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 1.0]])
    advantages, returns = ppo.compute_gae(rewards, values, torch.ones(1, 2), gamma=1.0, lam=0.5)
    # t=1: delta = 2 - 1 = 1, A1 = 1;  t=0: delta = 1 + 1 - 0.5 = 1.5, A0 = 1.5 + 0.5 * 1 = 2
    torch.testing.assert_close(advantages, torch.tensor([[2.0, 1.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.5, 2.0]]))
    advantages, returns = ppo.compute_gae(rewards, values, torch.tensor([[1.0, 0.0]]), gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[0.5, 0.0]]))  # padding carries no reward nor value
    torch.testing.assert_close(returns, torch.tensor([[1.0, 0.0]]))


def test_rewards_are_kl_penalties_plus_the_score_on_the_last_real_token():
    logprobs, ref_logprobs = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    rewards, kl = ppo.compute_rewards(torch.tensor([3.0]), logprobs, ref_logprobs, torch.ones(1, 2), kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 3.0]]))
    rewards, _ = ppo.compute_rewards(torch.tensor([3.0]), logprobs, ref_logprobs, torch.tensor([[1.0, 0.0]]), 0.1)
    torch.testing.assert_close(rewards, torch.tensor([[2.95, 0.0]]))


def test_policy_loss_clips_the_ratio_only_against_the_advantage():
    new, old, mask = torch.tensor([[0.0]]), torch.tensor([[math.log(0.5)]]), torch.ones(1, 1)  # ratio 2
    loss, clip_fraction, _ = policy_loss(new, old, torch.tensor([[1.0]]), mask, cliprange=0.2)
    assert loss.item() == pytest.approx(-1.2) and clip_fraction.item() == 1.0
    loss, clip_fraction, _ = policy_loss(new, old, torch.tensor([[-1.0]]), mask, cliprange=0.2)
    assert loss.item() == pytest.approx(2.0) and clip_fraction.item() == 0.0


def test_value_loss_takes_the_worse_of_clipped_and_unclipped():
    loss, clip_fraction = value_loss(
        torch.tensor([[2.0]]), torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.ones(1, 1), cliprange_value=0.5
    )
    assert loss.item() == pytest.approx(0.5 * (1.5 - 3.0) ** 2) and clip_fraction.item() == 1.0


def test_response_mask_ends_at_the_first_stop_token():
    responses = torch.tensor([[5, 9, 7, 9], [5, 6, 7, 8]])
    mask, has_stop = ppo.response_mask(responses, [9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]] and has_stop.tolist() == [True, False]
    assert ppo.truncate_after_stop(responses, [9], 0).tolist() == [[5, 9, 0, 0], [5, 6, 7, 8]]


def test_whitening_gives_zero_mean_unit_variance_on_the_mask():
    values, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    whitened = ppo.masked_whiten(values, mask)
    torch.testing.assert_close(whitened, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-4, rtol=0)


SYMPTOMS = "头痛 咳嗽 发烧 胃痛 腰痛 失眠 牙痛 鼻塞 眼睛干 喉咙痛 腹泻 皮疹"
QUESTIONS = [f"{symptom}怎么办？" for symptom in SYMPTOMS.split()]
GOOD, BAD = "请去看医生。", "多喝热水。"


@pytest.fixture(scope="module")
def rlhf_setup(tiny_model_dir, tmp_path_factory):
    """An SFT policy that answers every question either way about half the time, and a LoRA reward model that
    prefers seeing a doctor. PPO trains on 8 of the questions and is evaluated on the 4 others."""
    root = tmp_path_factory.mktemp("rlhf")
    train_q, held_out_q = QUESTIONS[:8], QUESTIONS[8:]
    sft_data = write_jsonl(root / "sft" / "train.jsonl",
                           [{"instruction": q, "output": a} for q in QUESTIONS for a in (GOOD, BAD)])  # fmt: skip
    ppo_prompts = write_jsonl(root / "prompts" / "train.jsonl", [{"instruction": q, "output": GOOD} for q in train_q])
    write_jsonl(root / "prompts" / "eval" / "eval.jsonl", [{"instruction": q, "output": GOOD} for q in held_out_q * 4])
    pairs = write_jsonl(
        root / "rm" / "pairs.jsonl", [{"prompt": q, "chosen": GOOD, "rejected": BAD} for q in QUESTIONS]
    )
    sft = root / "sft-model"
    supervised_finetuning.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(sft_data),
                                "--template_name", "qwen", "--do_train", "--num_train_epochs", "20",
                                "--learning_rate", "3e-3", "--per_device_train_batch_size", "8",
                                "--output_dir", str(sft), "--save_strategy", "no", *FAST_FLAGS])  # fmt: skip
    rm = root / "rm-model"
    reward_modeling.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(pairs),
                          "--template_name", "qwen", "--do_train", "--use_peft", "True", "--learning_rate", "5e-3",
                          "--num_train_epochs", "8", "--per_device_train_batch_size", "4", "--output_dir", str(rm),
                          "--save_strategy", "no", *FAST_FLAGS])  # fmt: skip
    return {"sft": str(sft), "rm": str(rm), "train": str(ppo_prompts), "eval": str(root / "prompts" / "eval")}


def ppo_argv(setup, output_dir, *extra):
    return ["--sft_model_path", setup["sft"], "--reward_model_path", setup["rm"], "--template_name", "qwen",
            "--train_file_dir", setup["train"], "--validation_file_dir", setup["eval"], "--do_train",
            "--use_peft", "True", "--lora_rank", "16", "--output_dir", str(output_dir), "--response_length", "12",
            "--per_device_train_batch_size", "8", "--logging_steps", "1", "--report_to", "none",
            "--bf16", "False", "--gradient_checkpointing", "False", *extra]  # fmt: skip


def logged(output_dir, key):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry]


def test_ppo_raises_the_held_out_reward_with_bounded_kl(rlhf_setup, tmp_path):
    out = tmp_path / "ppo"
    ppo_training.main(ppo_argv(rlhf_setup, out, "--total_episodes", "64", "--learning_rate", "2e-3",
                               "--missing_eos_penalty", "1.0", "--num_ppo_epochs", "2", "--eval_strategy", "steps",
                               "--eval_steps", "4", "--eval_on_start", "True", "--save_strategy", "no"))  # fmt: skip
    eval_scores, train_scores, kls = logged(out, "eval_score"), logged(out, "score"), logged(out, "kl")
    print("eval score", eval_scores, "\ntrain score", train_scores, "\nkl", kls)
    assert eval_scores[-1] > eval_scores[0] + 1.0, "the held-out mean reward rises clearly"
    assert max(kls) < 5.0, "the policy stays near the SFT model"


def tutorial_ppo_argv(sft, rm, output_dir):
    """The tutorial's PPO command with local adapter directories, few episodes and short responses."""
    return [
        "--sft_model_path", sft, "--reward_model_path", rm, "--template_name", "qwen", "--torch_dtype", "bfloat16",
        "--train_file_dir", str(REPO / "data" / "finetune"), "--validation_file_dir", str(REPO / "data" / "finetune"),
        "--max_source_length", "1024", "--response_length", "16", "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "4", "--gradient_checkpointing", "True", "--do_train",
        "--total_episodes", "8", "--output_dir", str(output_dir), "--missing_eos_penalty", "1.0",
        "--eval_strategy", "steps", "--eval_steps", "100", "--num_train_epochs", "3", "--report_to", "tensorboard",
    ]  # fmt: skip


def test_tutorial_ppo_command_saves_a_policy_that_loads(sft_adapter_dir, rm_adapter_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "outputs-ppo-qwen-v1"
    ppo_training.main(tutorial_ppo_argv(sft_adapter_dir, rm_adapter_dir, out))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2  # 8 episodes / (1 x 4 per update)
    assert {"score", "kl", "entropy", "policy_loss", "value_loss", "clip_fraction", "response_length"} <= set(
        state["log_history"][0]
    )
    assert list((out / "runs").rglob("events.out.tfevents.*"))
    policy = AutoModelForCausalLM.from_pretrained(out)  # no --use_peft: full weights
    sft_merged = load_model(ModelArguments(model_name_or_path=sft_adapter_dir))
    changed = [
        n for n, p in policy.named_parameters() if not torch.equal(p.float(), sft_merged.state_dict()[n].float())
    ]
    assert changed, "PPO must change the policy's weights"


def test_ppo_under_torchrun_follows_the_one_process_lr_schedule(rlhf_setup, tmp_path):
    """Same global batch (1 x 4 and 2 x 2 prompts): the same 4 updates of 2 optimizer steps each, and the same LR at
    every update. accelerate's scheduler wrapper once stepped the LR twice per step under 2 processes (0 by update 2);
    ranks training alone would take 8 updates."""
    argv = ["--total_episodes", "16", "--num_ppo_epochs", "2", "--learning_rate", "1e-3", "--save_strategy", "no"]
    one = tmp_path / "ppo-1"
    ppo_training.main(ppo_argv(rlhf_setup, one, *argv, "--per_device_train_batch_size", "4"))
    two = tmp_path / "ppo-2"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29702"]
    two_argv = ppo_argv(rlhf_setup, two, *argv, "--per_device_train_batch_size", "2")
    result = run([*launcher, "ppo_training.py", *two_argv])
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [round(1e-3 * (1 - 2 * update / 8), 6) for update in (1, 2, 3, 4)]  # linear decay over 8 steps
    assert logged(one, "lr") == expected
    assert logged(two, "lr") == expected
    assert json.loads((two / "trainer_state.json").read_text())["global_step"] == 4


def test_ppo_resumes_from_its_last_checkpoint(rlhf_setup, tmp_path):
    out = tmp_path / "ppo"
    common = ["--num_ppo_epochs", "1", "--save_strategy", "steps", "--save_steps", "1"]
    ppo_training.main(ppo_argv(rlhf_setup, out, "--total_episodes", "16", *common))
    assert (out / "checkpoint-2" / "policy" / "adapter_model.safetensors").exists()
    assert not list((out / ".partial").glob("checkpoint-*")), "nothing left half-written"
    first_run = json.loads((out / "trainer_state.json").read_text())["log_history"]
    ppo_training.main(ppo_argv(rlhf_setup, out, "--total_episodes", "24", *common))
    resumed = json.loads((out / "trainer_state.json").read_text())
    assert resumed["global_step"] == 3
    assert resumed["log_history"][: len(first_run)] == first_run


@pytest.mark.parametrize("algorithm", ["rloo", "grpo"])
def test_critic_free_modes_use_the_same_reward_model(algorithm, rlhf_setup, tmp_path, monkeypatch):
    """The reward trl logs is RewardModelScorer's, and RewardModelScorer scores a fixed completion exactly as a plain
    AutoModelForSequenceClassification (the LoRA reward model merged with peft) scores its official rendering."""
    calls = []

    class RecordingScorer(build.RewardModelScorer):
        def __call__(self, *args, **kwargs):
            calls.append((self, super().__call__(*args, **kwargs)))
            return calls[-1][1]

    monkeypatch.setattr(build, "RewardModelScorer", RecordingScorer)
    out = tmp_path / algorithm
    argv = ppo_argv(rlhf_setup, out, "--rl_algorithm", algorithm, "--max_steps", "2", "--num_generations", "4",
                    "--save_strategy", "no", "--missing_eos_penalty", "1.0")  # fmt: skip
    argv[argv.index("--per_device_train_batch_size") + 1] = "4"
    ppo_training.main(argv)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    logged = [entry["rewards/reward_model/mean"] for entry in history if "rewards/reward_model/mean" in entry]
    assert logged == pytest.approx([sum(scores) / len(scores) for _, scores in calls], abs=1e-5)
    assert (out / "adapter_config.json").exists()

    scorer = calls[0][0]
    tokenizer = scorer.tokenizer
    question = QUESTIONS[9]
    chat = [{"role": "user", "content": question}, {"role": "assistant", "content": GOOD}]
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    completion = tokenizer.encode(GOOD + "<|im_end|>", add_special_tokens=False)
    plain = plain_reward_model(rlhf_setup["rm"])
    rendering = tokenizer(tokenizer.apply_chat_template(chat, tokenize=False), return_tensors="pt")
    with torch.no_grad():
        expected = plain(**rendering).logits[0, 0].item()
    assert scorer([prompt], None, [completion]) == pytest.approx([expected], abs=1e-5)
    assert scorer([prompt], None, [completion[:-1]]) == pytest.approx(  # no stop: penalised, no closing "\n"
        [plain(**tokenizer(prompt + GOOD, return_tensors="pt")).logits[0, 0].item() - 1.0], abs=1e-5
    )


def plain_reward_model(adapter_dir):
    """A LoRA reward model as someone outside the project loads it: base model, adapter, merged."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForSequenceClassification

    base = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().eval()
    model.config.pad_token_id = load_tokenizer(ModelArguments(model_name_or_path=adapter_dir)).pad_token_id
    return model
