"""PPO rollouts: sampled from exactly the distribution the loss scores, log-probs in bounded memory, one reward-model
scoring convention inside and outside the project, the optional KL / reward-normalisation maths, and --use_vllm."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import ppo_training
import reward_modeling
from medicalgpt.rl import ppo_math as ppo
from medicalgpt.rl import rollout
from medicalgpt.rl.config import PPOConfig
from medicalgpt.rl.models import left_pad
from medicalgpt.rl.ppo_loss import ppo_loss
from medicalgpt.rl.rewards import RewardModelScorer, closing_ids
from medicalgpt.rl.trainer import PPOTrainer
from medicalgpt.templates import get_conv_template
from tests.helpers import FAST_FLAGS, write_jsonl

# -- the maths, on hand-computed numbers ---------------------------------------------------------------------------


def test_selected_logprobs_equal_the_log_softmax_and_its_gradient(monkeypatch):
    monkeypatch.setattr(ppo, "LOGIT_CHUNK_ELEMENTS", 3 * 11)  # 3 rows per chunk: 7 rows in 3 chunks
    logits = torch.randn(7, 11, requires_grad=True)
    tokens = torch.randint(0, 11, (7,))
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    got = ppo.selected_logprobs(logits, tokens, 0.7)
    torch.testing.assert_close(got, expected)
    (grad_expected,) = torch.autograd.grad(expected.sum(), logits)
    (grad_got,) = torch.autograd.grad(got.sum(), logits)
    torch.testing.assert_close(grad_got, grad_expected)
    probs = torch.softmax(logits / 0.7, -1)
    torch.testing.assert_close(ppo.entropy_from_logits(logits, 0.7), -(probs * probs.log()).sum(-1))


def test_selected_logprobs_of_bfloat16_logits_are_float32():
    logits, tokens = torch.randn(2, 3, 50).bfloat16(), torch.randint(0, 50, (2, 3))
    expected = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    got = ppo.selected_logprobs(logits, tokens, 1.0)
    assert got.dtype == torch.float32 and got.shape == (2, 3)
    torch.testing.assert_close(got, expected)


def test_k3_kl_estimate_on_hand_computed_numbers():
    logprobs, ref_logprobs = torch.tensor([[-1.0, -2.0, -1.0]]), torch.tensor([[-1.5, -1.5, -1.0]])
    # log r = ref - logprob = -0.5, 0.5, 0:  k3 = exp(log r) - 1 - log r
    expected = torch.tensor([[math.exp(-0.5) - 0.5, math.exp(0.5) - 1.5, 0.0]])
    torch.testing.assert_close(ppo.kl_estimate(logprobs, ref_logprobs, "k3"), expected)
    torch.testing.assert_close(ppo.kl_estimate(logprobs, ref_logprobs, "k1"), torch.tensor([[0.5, -0.5, 0.0]]))
    rewards, kl = ppo.compute_rewards(torch.tensor([2.0]), logprobs, ref_logprobs, torch.tensor([[1.0, 1.0, 0.0]]),
                                      kl_coef=0.1, estimator="k3")  # fmt: skip
    torch.testing.assert_close(kl, expected * torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.1 * expected[0, 0], 2.0 - 0.1 * expected[0, 1], 0.0]]))


def test_adaptive_kl_controller_on_hand_computed_numbers():
    controller = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9 over target 6: error 0.5 clipped to 0.2; 1000 episodes: x (1 + 0.2 * 0.1) = 0.102
    assert controller.update(9.0, 1000) == pytest.approx(0.102)
    # KL 5: error -1/6; x (1 - 1/6 * 0.1)
    assert controller.update(5.0, 1000) == pytest.approx(0.102 * (1 - 1 / 60))


def test_running_moments_match_the_statistics_of_everything_seen():
    moments = ppo.RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([4.0, 5.0]))
    assert moments.mean == pytest.approx(3.0) and moments.std == pytest.approx(math.sqrt(2.5))  # unbiased, 1..5
    torch.testing.assert_close(moments.normalize(torch.tensor([6.0])), torch.tensor([3.0 / math.sqrt(2.5)]))


def test_bad_rollout_options_fail_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--kl_estimator"):
        PPOConfig(output_dir=str(tmp_path), kl_estimator="k2", report_to="none")
    with pytest.raises(ValueError, match="--target_kl"):
        PPOConfig(output_dir=str(tmp_path), target_kl=0.0, report_to="none")
    with pytest.raises(ValueError, match="--use_vllm needs vLLM"):  # vLLM is not installed on the test machine
        PPOConfig(output_dir=str(tmp_path), use_vllm=True, report_to="none")


# -- a trainer on the tiny model, without LoRA -----------------------------------------------------------------------


def build_trainer(model_dir, tmp_path, tokenizer=None, closing=(), **options):
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_dir)
    config = PPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4,
                       response_length=8, temperature=0.9, seed=3, **options)  # fmt: skip
    policy, reference = (AutoModelForCausalLM.from_pretrained(model_dir) for _ in range(2))
    critic, reward = (AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1) for _ in range(2))
    for model in (critic, reward):
        model.config.pad_token_id = tokenizer.pad_token_id
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in PROMPTS]
    return PPOTrainer(config, policy=policy, critic=critic, tokenizer=tokenizer, train_prompts=prompts,
                      eval_prompts=prompts[:2], stop_token_ids=stops, ref_policy=reference, reward_model=reward,
                      closing_ids=closing)  # fmt: skip


PROMPTS = [
    "<|im_start|>user\n头痛怎么办？<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\n小孩发烧到三十九度，晚上一直咳嗽，怎么办？<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\n失眠<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\n胃痛吃什么药？<|im_end|>\n<|im_start|>assistant\n",
]


def test_rollout_logprobs_are_those_of_the_distribution_generation_sampled_from(tiny_model_dir, tmp_path):
    """The model's own generation_config asks for a repetition penalty and top-k; rollouts must ignore both, so
    that the log-probs PPO stores equal those of the processed scores generate sampled from."""
    trainer = build_trainer(tiny_model_dir, tmp_path, local_rollout_forward_batch_size=2)
    policy = trainer.unwrapped.policy
    policy.generation_config.repetition_penalty, policy.generation_config.top_k = 1.3, 5
    sampled_from = []
    generate = policy.generate

    def recording_generate(**kwargs):
        output = generate(**kwargs, output_scores=True, return_dict_in_generate=True)
        sampled_from.append(torch.stack(output.scores, dim=1))  # [rows, steps, vocabulary] after all processors
        return output.sequences

    policy.generate = recording_generate
    batch = trainer.rollout(trainer.train_prompts)
    assert [chunk.shape[0] for chunk in sampled_from] == [4], "one generate call for the batch"
    assert policy.generation_config.top_k == 5, "the model's own config is restored"
    width = max(chunk.shape[1] for chunk in sampled_from)
    scores = torch.cat([torch.nn.functional.pad(c, (0, 0, 0, width - c.shape[1])) for c in sampled_from])
    assert torch.isfinite(scores).all(), "no top-k: every token keeps its probability"
    mask = batch["mask"].bool()
    assert mask.sum() > 8
    expected = torch.log_softmax(scores.float(), -1).gather(-1, batch["responses"][..., None]).squeeze(-1)
    torch.testing.assert_close(batch["logprobs"][mask], expected[: mask.shape[0], : mask.shape[1]][mask],
                               atol=2e-4, rtol=0)  # fmt: skip


def test_micro_batched_logprobs_equal_one_full_batch_log_softmax(tiny_model_dir, tmp_path):
    trainer = build_trainer(tiny_model_dir, tmp_path)
    queries, query_mask = left_pad(trainer.train_prompts, trainer.tokenizer.pad_token_id)
    responses = torch.randint(5, 200, (4, 6))
    input_ids, attention_mask = torch.cat([queries, responses], 1), torch.cat([query_mask, torch.ones(4, 6)], 1).long()
    results = {}
    for micro in (1, 3, 4):
        trainer.config.local_rollout_forward_batch_size = micro
        results[micro] = trainer._rollout_logprobs(input_ids, attention_mask, responses)
    logits, values = trainer.model(input_ids, attention_mask)  # today's full batch, full log-softmax
    context = queries.shape[1]
    full = torch.log_softmax(logits[:, context - 1 : -1].float() / 0.9, -1).gather(-1, responses[..., None])[..., 0]
    for logprobs, micro_values, ref_logprobs in results.values():
        torch.testing.assert_close(logprobs, full, atol=1e-5, rtol=0)
        torch.testing.assert_close(ref_logprobs, full, atol=1e-5, rtol=0)  # the reference starts as the policy
        torch.testing.assert_close(micro_values, values, atol=1e-5, rtol=0)


def test_the_ppo_loss_runs_the_vocabulary_head_only_where_it_reads_with_bit_identical_loss_and_gradients(
    tiny_model_dir, tmp_path
):
    """The loss's forward keeps only the response positions' logits (the head on the prompt was wasted work):
    the loss, its statistics and every gradient of a seeded step equal, bit for bit, those of the head run on
    every position and sliced afterwards (how the loss read them before)."""
    trainer = build_trainer(tiny_model_dir, tmp_path)
    batch = trainer.rollout(trainer.train_prompts)
    width = batch["responses"].shape[1]
    assert batch["context"] > 4 and batch["mask"].sum() > 8, "a real prompt and responses to score"
    head_rows = []
    head = trainer.unwrapped.policy.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, output: head_rows.append(args[0].shape[1]))

    def every_position(input_ids, attention_mask, logits_to_keep):  # the head on all positions, then sliced
        logits, values = trainer.model(input_ids, attention_mask)
        return logits[:, -logits_to_keep:], values

    results = []
    for model in (trainer.model, every_position):
        trainer.model.zero_grad()
        loss, stats = ppo_loss(model, batch, trainer.config)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), stats, grads))
    hook.remove()
    assert head_rows == [width + 1, batch["input_ids"].shape[1]]
    (loss, stats, grads), (loss_before, stats_before, grads_before) = results
    assert torch.equal(loss, loss_before) and stats == stats_before
    assert grads.keys() == grads_before.keys() and len(grads) > 10
    assert all(torch.equal(grads[name], grads_before[name]) for name in grads)
    assert any(g.abs().sum() > 0 for name, g in grads.items() if "critic" in name), "the value loss trains too"


def test_the_server_samples_with_only_the_options_the_request_or_flags_name(tiny_model_dir):
    from medicalgpt.serve.chat import ChatEngine, GenerationOptions

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.generation_config.repetition_penalty, model.generation_config.top_k = 1.3, 5
    engine = ChatEngine(model, tokenizer, get_conv_template("qwen"))
    generate, seen = engine.model.generate, []

    def recording_generate(**kwargs):
        output = generate(**kwargs, output_scores=True, output_logits=True, return_dict_in_generate=True)
        seen.append((torch.stack(output.scores, 1), torch.stack(output.logits, 1)))
        return output.sequences

    engine.model.generate = recording_generate
    chat = [[{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "头痛"},
             {"role": "user", "content": "头痛头痛头痛"}]]  # fmt: skip
    engine.generate(chat, GenerationOptions(max_new_tokens=6, temperature=0.7, top_p=1.0))
    scores, logits = seen[-1]
    torch.testing.assert_close(scores, logits / 0.7)  # no inherited repetition penalty, no top-k
    engine.generate(chat, GenerationOptions(max_new_tokens=6, temperature=0.7, top_p=0.5))
    scores, logits = seen[-1]
    assert torch.isinf(scores).any(), "a named top_p applies"


# -- the reward model's scoring convention ---------------------------------------------------------------------------


@pytest.mark.parametrize("closing", ["\n", ""], ids=["chatml-newline", "ends-at-stop"])
def test_ppo_scores_where_a_plain_reward_model_reads_with_pad_equal_to_stop(closing, tiny_model_dir, tmp_path):
    """pad == stop (Llama-3-Instruct's <|eot_id|> once pad is set to EOS): PPO's scores equal a plain
    AutoModelForSequenceClassification's on each unpadded full rendering, and so do RewardModelScorer's."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = "<|im_end|>"
    suffix = tokenizer.encode(closing, add_special_tokens=False)
    trainer = build_trainer(tiny_model_dir, tmp_path, tokenizer=tokenizer, closing=suffix)
    stop, pad = trainer.stop_token_ids[0], tokenizer.pad_token_id
    assert stop == pad
    queries, query_mask = left_pad(trainer.train_prompts[:3], pad)
    responses = torch.tensor([[11, 12, stop, pad, pad], [21, 22, 23, 24, stop], [31, 32, 33, 34, 35]])
    scores, _, has_stop = trainer.score(queries, query_mask, responses)
    assert has_stop.tolist() == [True, True, False]
    completions = [[11, 12, stop], [21, 22, 23, 24, stop], [31, 32, 33, 34, 35]]
    plain = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    plain.score.load_state_dict(trainer.reward_model.score.state_dict())  # the same (random) head
    plain.config.pad_token_id = pad
    expected = [
        plain(input_ids=torch.tensor([prompt + completion + (suffix if completion[-1] == stop else [])])).logits[0, 0]
        for prompt, completion in zip(trainer.train_prompts, completions)
    ]
    torch.testing.assert_close(scores, torch.stack(expected).detach(), atol=1e-5, rtol=0)
    scorer = RewardModelScorer(trainer.reward_model, tokenizer, trainer.stop_token_ids, None, suffix)
    by_scorer = scorer(PROMPTS[:3], None, [completions[0] + [pad] * 2, *completions[1:]])  # pads after a stop
    torch.testing.assert_close(torch.tensor(by_scorer), scores, atol=1e-5, rtol=0)


SYMPTOMS = "头痛 咳嗽 发烧 胃痛 腰痛 失眠 牙痛 鼻塞 眼睛干 喉咙痛 腹泻 皮疹"
QUESTIONS = [f"{symptom}怎么办？" for symptom in SYMPTOMS.split()]
GOOD, BAD = "请去看医生。", "多喝热水。"


def test_a_reward_model_trained_here_ranks_official_chat_template_renderings(tiny_model_dir, tmp_path):
    """Trained here, then read outside: held-out pairs rendered by tokenizer.apply_chat_template and scored by a plain
    AutoModelForSequenceClassification get exactly the project's scores, and are ranked right."""
    train_q, held_out = QUESTIONS[:8], QUESTIONS[8:]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": GOOD, "rejected": BAD} for q in train_q])
    out = tmp_path / "rm"
    reward_modeling.main(["--model_name_or_path", tiny_model_dir, "--train_file_dir", str(pairs), "--template_name",
                          "qwen", "--do_train", "--learning_rate", "3e-3", "--num_train_epochs", "6",
                          "--per_device_train_batch_size", "4", "--output_dir", str(out), "--save_strategy", "no",
                          *FAST_FLAGS])  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    template = get_conv_template("qwen")
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    scorer = RewardModelScorer(model, tokenizer, stops, None, closing_ids(tokenizer, template))
    official, inside = {}, {}
    for answer in (GOOD, BAD):
        chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": answer}] for q in held_out]
        texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
        with torch.no_grad():
            official[answer] = torch.stack([model(**tokenizer(t, return_tensors="pt")).logits[0, 0] for t in texts])
        prompts = [template.get_prompt([[q, ""]]) for q in held_out]
        completion = tokenizer.encode(answer, add_special_tokens=False) + stops
        inside[answer] = torch.tensor(scorer(prompts, None, [completion] * len(held_out)))
    assert (official[GOOD] > official[BAD]).all(), "held-out pairs ranked right as the ecosystem renders them"
    for answer in (GOOD, BAD):
        torch.testing.assert_close(inside[answer], official[answer], atol=1e-5, rtol=0)


# -- vLLM -------------------------------------------------------------------------------------------------------------


def test_use_vllm_without_vllm_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ppo_training.main(["--sft_model_path", "x", "--reward_model_path", "y", "--use_vllm", "True",
                           "--output_dir", "unused", "--report_to", "none"])  # fmt: skip
    assert exit_info.value.code != 0
    assert "--use_vllm needs vLLM" in capsys.readouterr().err


class FakeVLLMGeneration:
    """Stands in for trl's VLLMGeneration (the engine call is what CPU tests cannot run)."""

    def __init__(self, completions):
        self.completions, self.prompts, self.syncs = completions, [], 0

    def sync_weights(self):
        self.syncs += 1

    def generate(self, prompts, images, num_generations):
        self.prompts.append(prompts)
        completions = self.completions[: len(prompts)]
        return prompts, completions, None, None


def test_vllm_rollouts_get_the_prompts_unpadded_and_fresh_weights_each_update(tiny_model_dir, tmp_path, monkeypatch):
    from trl import import_utils

    monkeypatch.setattr(import_utils, "is_vllm_available", lambda: True)
    built = []

    def fake_build(policy, accelerator, tokenizer, config, stop_token_ids, max_model_length):
        assert rollout.vllm_sampling(config, stop_token_ids) == dict(
            temperature=0.9, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, max_completion_length=8,
            logprobs=0, generation_kwargs={"stop_token_ids": stop_token_ids},
        )  # fmt: skip
        stop = stop_token_ids[0]
        built.append(FakeVLLMGeneration([[7, 8, stop], [9, stop], [5, 6, 7, 8, 9, 10, 11, 12], [4, 4, stop]]))
        return built[-1]

    monkeypatch.setattr(rollout, "build_vllm_generator", fake_build)
    trainer = build_trainer(tiny_model_dir, tmp_path, use_vllm=True, max_steps=2, num_ppo_epochs=1)
    trainer.train()
    (engine,) = built
    assert engine.syncs == 2, "weights pushed before each rollout that follows an update"
    assert sorted(map(tuple, engine.prompts[0])) == sorted(map(tuple, trainer.train_prompts))
    stop = trainer.stop_token_ids[0]
    batch = trainer.rollout(trainer.train_prompts)
    pad = trainer.tokenizer.pad_token_id
    assert batch["responses"].tolist()[0] == [7, 8, stop] + [pad] * 5
    assert batch["mask"].sum(1).tolist() == [3, 2, 8, 3]


def test_adaptive_kl_and_reward_normalisation_carry_from_rollout_to_rollout(tiny_model_dir, tmp_path):
    trainer = build_trainer(tiny_model_dir, tmp_path, target_kl=0.001, kl_horizon=100, normalize_reward=True)
    batch = trainer.rollout(trainer.train_prompts)
    assert batch["kl_coef"] == 0.05, "the first rollout uses --kl_coef"
    error = min(max(batch["kl"].sum(1).mean().item() / 0.001 - 1, -0.2), 0.2)
    assert trainer.shaping.kl_coef == pytest.approx(0.05 * (1 + error * 4 / 100))
    moments = trainer.shaping.moments
    assert moments.count == 4 and moments.mean == pytest.approx(batch["scores"].mean().item(), abs=1e-6)
    trainer.write_state(str(tmp_path))
    resumed = build_trainer(tiny_model_dir, tmp_path / "again", target_kl=0.001, kl_horizon=100, normalize_reward=True)
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    resumed.shaping.load_state_dict(state["reward_shaping"])
    assert resumed.shaping.state_dict() == trainer.shaping.state_dict()
