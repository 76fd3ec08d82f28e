"""PPO rollouts: sampling from exactly the distribution the loss uses, and log-probs in bounded memory.

Sampling. `model.generate` fills every field a `GenerationConfig` leaves unset from the model's own
`generation_config` (transformers 5.23 `_prepare_generation_config`), then from global defaults (`top_k` 50).
Qwen2.5-Instruct ships `repetition_penalty 1.05, top_k 20, top_p 0.8, temperature 0.7`: a rollout config that leaves
them unset samples from a penalised, truncated distribution while PPO's ratios and KL use `softmax(logits / T)`,
a biased policy gradient. So rollouts use `sampling_config` (built from scratch, every processor neutral) inside
`own_generation_config` (the model's config swapped for an empty one while generating): the tokens are sampled
from exactly `softmax(logits / temperature)`, the distribution `ppo.selected_logprobs` scores.

Memory. Rollout forwards run `micro_batch` sequences at a time, compute logits only for the response positions
(`logits_to_keep`), and reduce them at once to one log-prob per token (`ppo.selected_logprobs`: the chosen logit
minus a chunked logsumexp). Peak memory then depends on the micro-batch, not on the rollout batch
(bench/ppo_rollout_memory.py). Generation needs no such bound (it keeps one position's logits per step): PPOTrainer
decodes its whole batch in one `generate` call.
"""

import contextlib
import logging

import torch
from transformers import GenerationConfig

from medicalgpt.rl import ppo_math as ppo

logger = logging.getLogger("medicalgpt")


def stop_token_ids(tokenizer, template):
    """Token ids that end a response: the template's end-of-turn token and the tokenizer's EOS."""
    ids = []
    stop_ids = tokenizer.encode(template.stop_str, add_special_tokens=False) if template.stop_str else []
    if len(stop_ids) == 1:
        ids.append(stop_ids[0])
    elif stop_ids:
        logger.warning(
            "The template's stop string %r is %d tokens; stopping at EOS only.", template.stop_str, len(stop_ids)
        )
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def sampling_config(max_new_tokens, stop_token_ids, pad_token_id, temperature=None):
    """A GenerationConfig from scratch: plain sampling at `temperature` (greedy when None), stopping at
    `stop_token_ids`; no top-k, top-p, repetition penalty or any other logits processor."""
    sampling = {"do_sample": False}
    if temperature is not None:  # top_k 0 and top_p 1 turn off truncation (transformers' global top_k is 50)
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_token_ids),
        pad_token_id=pad_token_id,
        repetition_penalty=1.0,
        **sampling,
    )


@contextlib.contextmanager
def own_generation_config(model):
    """While inside, `model.generate` inherits nothing from the model's generation_config: it is swapped for an
    empty one (on a peft model also on its base model, which peft 0.21 `generate` overwrites with its own)."""
    targets = [model]
    if hasattr(model, "get_base_model"):
        targets.append(model.get_base_model())
    saved = [(target, target.generation_config) for target in targets if hasattr(target, "generation_config")]
    for target, _ in saved:
        target.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for target, config in saved:
            target.generation_config = config


def micro_batches(size, micro_batch):
    return [slice(start, min(start + micro_batch, size)) for start in range(0, size, micro_batch)]


def pad_to_width(responses, width, pad_token_id):
    """Right-pads [batch, length] responses to `width` columns."""
    if responses.shape[1] >= width:
        return responses
    padding = responses.new_full((responses.shape[0], width - responses.shape[1]), pad_token_id)
    return torch.cat([responses, padding], dim=1)


def generate_responses(policy, queries, query_mask, generation_config, micro_batch):
    """New tokens for left-padded queries, `micro_batch` queries per `generate` call, right-padded to one width."""
    chunks = []
    with own_generation_config(policy):
        for rows in micro_batches(len(queries), micro_batch):
            output = policy.generate(
                input_ids=queries[rows], attention_mask=query_mask[rows], generation_config=generation_config
            )
            chunks.append(output[:, queries.shape[1] :])
    width = max(chunk.shape[1] for chunk in chunks)
    return torch.cat([pad_to_width(chunk, width, generation_config.pad_token_id) for chunk in chunks])


def response_logprobs(logits_fn, input_ids, attention_mask, responses, temperature, micro_batch):
    """log p(response token) under softmax(logits / temperature), `micro_batch` sequences per forward.

    `logits_fn(input_ids, attention_mask, logits_to_keep)` returns logits for the last `logits_to_keep` positions
    (and optionally values); only the response positions' logits are ever computed, and each micro-batch's are
    reduced to log-probs before the next forward. Returns (logprobs, extras) where extras concatenates whatever
    else logits_fn returned per micro-batch (the critic's values)."""
    keep = responses.shape[1] + 1  # the logit before each response token, and one past the last
    logprobs, extras = [], []
    for rows in micro_batches(len(input_ids), micro_batch):
        output = logits_fn(input_ids[rows], attention_mask[rows], keep)
        logits, extra = (output, None) if torch.is_tensor(output) else output
        logprobs.append(ppo.selected_logprobs(logits[:, :-1], responses[rows], temperature))
        extras.append(extra)
        del output, logits
    extras = None if extras[0] is None else torch.cat(extras)
    return torch.cat(logprobs), extras


def check_rollout_options(config):
    """PPOConfig's rollout options: a ValueError (one line, naming the flag) for values that cannot work."""
    if config.kl_estimator not in ("k1", "k3"):
        raise ValueError(f"--kl_estimator must be k1 or k3, got {config.kl_estimator!r}")
    if config.target_kl is not None and config.target_kl <= 0:
        raise ValueError(f"--target_kl must be positive, got {config.target_kl}")
    if config.local_rollout_forward_batch_size is not None and config.local_rollout_forward_batch_size < 1:
        raise ValueError("--local_rollout_forward_batch_size must be at least 1")
    if config.use_vllm:
        from trl.import_utils import is_vllm_available

        if not is_vllm_available():
            raise ValueError("--use_vllm needs vLLM, which is not installed: pip install vllm (it needs CUDA GPUs)")


class RewardShaping:
    """The KL coefficient (fixed, or adaptive with --target_kl) and the score normalisation (--normalize_reward) of a
    PPO run: the state that carries from one rollout batch to the next."""

    def __init__(self, config):
        self.kl_estimator = config.kl_estimator
        self.kl_controller = ppo.AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
        self.adaptive = config.target_kl is not None
        self.moments = ppo.RunningMoments() if config.normalize_reward else None

    @property
    def kl_coef(self):
        return self.kl_controller.value

    def normalize(self, scores, gathered_scores):
        """`scores` normalised by the running moments after adding the batch of all processes."""
        if self.moments is None:
            return scores
        self.moments.update(gathered_scores)
        return self.moments.normalize(scores)

    def after_update(self, mean_kl, episodes):
        """Adapts the KL coefficient to the KL of the rollout batch just trained on (all processes' mean)."""
        if self.adaptive:
            self.kl_controller.update(mean_kl, episodes)

    def state_dict(self):
        moments = self.moments.state_dict() if self.moments is not None else None
        return {**self.kl_controller.state_dict(), "reward_moments": moments}

    def load_state_dict(self, state):
        self.kl_controller.load_state_dict(state)
        if self.moments is not None and state.get("reward_moments"):
            self.moments.load_state_dict(state["reward_moments"])


def build_vllm_generator(policy, accelerator, tokenizer, config, stop_token_ids, max_model_length):
    """trl's colocated vLLM engine (`trl.generation.vllm_generation.VLLMGeneration`, trl 1.16, as its GRPO/RLOO
    use it with vllm_mode="colocate"), sampling exactly softmax(logits / temperature): every other sampling
    parameter neutral and explicit, so vLLM's `generation_config="auto"` defaults do not apply."""
    check_rollout_options(config)
    from trl.generation.vllm_generation import VLLMGeneration

    return VLLMGeneration(
        model=policy,
        accelerator=accelerator,
        processing_class=tokenizer,
        mode="colocate",
        gpu_memory_utilization=config.vllm_gpu_memory_utilization,
        max_model_length=max_model_length,
        **vllm_sampling(config, stop_token_ids),
    )


def vllm_sampling(config, stop_token_ids):
    """VLLMGeneration's sampling arguments: plain sampling at --temperature, stopping at the template's stop ids."""
    return dict(
        temperature=config.temperature,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        repetition_penalty=1.0,
        max_completion_length=config.response_length,
        logprobs=0,
        generation_kwargs={"stop_token_ids": list(stop_token_ids)},
    )


def vllm_responses(generator, queries, query_mask, pad_token_id):
    """Responses from a VLLMGeneration for left-padded queries, as a right-padded [batch, length] tensor."""
    prompts = [row[mask.bool()].tolist() for row, mask in zip(queries, query_mask)]
    _, completions, _, _ = generator.generate(prompts=prompts, images=None, num_generations=1)
    width = max(1, max(len(c) for c in completions))
    rows = [list(c) + [pad_token_id] * (width - len(c)) for c in completions]
    return torch.tensor(rows, device=queries.device)
