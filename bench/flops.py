"""FLOPs of one SFT epoch, counted from the model's config and the tokens trained on, and model-FLOPs utilisation.

The count is the model's useful work, the same for every contender that trains on the same conversations: padding,
recomputation and logits nobody needs are not counted (a contender that does them anyway shows a lower MFU).

For a decoder with L layers of hidden size h, attention width a (heads x head_dim), grouped key/value width k
(key/value heads x head_dim), gated MLP width i (gate, up, down: SwiGLU as in Llama and Qwen2) and vocabulary V:

  N_body  = L * (h*a + 2*h*k + a*h + 3*h*i)      weights of the matrix products of the layers (norms, biases and
                                                  the embedding lookup are not matrix products: not counted)
  N_head  = h * V                                the LM head; computed where the loss needs it: at the learned
                                                  tokens (labels other than -100), not at every token
  N_lora  = L * r * sum(in + out)                LoRA rank r on the seven linear layers of each layer (all-linear)
  A       = sum over conversations of n(n+1)/2   (query, key) pairs of causal attention: each token attends to itself
                                                  and the tokens before it in its own conversation (packing's
                                                  block-diagonal mask), so a token attends to (n+1)/2 on average

  full training: 6 * N_body * real + 6 * N_head * learned + 12 * L * a * A
  LoRA:          4 * N_body * real + 4 * N_head * learned + 6 * N_lora * real + 12 * L * a * A

A weight used by a token costs 2 FLOPs forward, 2 backward for the input's gradient and 2 for the weight's gradient;
frozen weights (LoRA's base) need no weight gradient: 4 instead of 6. Attention costs 2*a FLOPs per pair for QK^T and
2*a for AV forward, twice that backward: 12 * a per pair and layer, with or without LoRA.

MFU = counted FLOPs / training seconds / measured peak FLOP/s (bench/peak.py).
"""

import json
import os

GATED_MLP = 3  # gate, up and down projections


def read_config(model):
    """The model's config.json as a dict (a folder, or a dict given as it is)."""
    if isinstance(model, dict):
        return model
    with open(os.path.join(model, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def dimensions(config):
    """(layers, hidden, attention width, key/value width, MLP width, vocabulary) of a Llama/Qwen2-shaped config."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return (
        config["num_hidden_layers"],
        config["hidden_size"],
        heads * head_dim,
        kv_heads * head_dim,
        config["intermediate_size"],
        config["vocab_size"],
    )


def linear_layers(config):
    """(name, in features, out features) of one decoder layer's linear layers, then the LM head."""
    _, hidden, attention, kv, mlp, vocab = dimensions(config)
    return [
        ("q_proj", hidden, attention), ("k_proj", hidden, kv), ("v_proj", hidden, kv), ("o_proj", attention, hidden),
        ("gate_proj", hidden, mlp), ("up_proj", hidden, mlp), ("down_proj", mlp, hidden), ("lm_head", hidden, vocab),
    ]  # fmt: skip


def parameter_counts(config, lora_rank=8):
    """{"body", "head", "lora"}: the weights the formulas above multiply."""
    layers = dimensions(config)[0]
    per_layer = [(fan_in, fan_out) for name, fan_in, fan_out in linear_layers(config) if name != "lm_head"]
    assert len(per_layer) == 4 + GATED_MLP
    _, hidden, _, _, _, vocab = dimensions(config)
    return {
        "body": layers * sum(fan_in * fan_out for fan_in, fan_out in per_layer),
        "head": hidden * vocab,
        "lora": layers * lora_rank * sum(fan_in + fan_out for fan_in, fan_out in per_layer),
    }


def attention_pairs(lengths):
    """Causal (query, key) pairs of conversations of these token counts, each attending only within itself."""
    return sum(n * (n + 1) // 2 for n in lengths)


def training_flops(config, method, real_tokens, learned_tokens, pairs, lora_rank=8):
    """FLOPs of training once on `real_tokens` tokens, `learned_tokens` of them learned, with `pairs` attention pairs;
    `method` is "full" or "lora"."""
    if method not in ("full", "lora"):
        raise ValueError(f"method must be full or lora, not {method!r}")
    layers, _, attention, _, _, _ = dimensions(config)
    counts = parameter_counts(config, lora_rank)
    per_weight = 6 if method == "full" else 4
    flops = per_weight * (counts["body"] * real_tokens + counts["head"] * learned_tokens)
    if method == "lora":
        flops += 6 * counts["lora"] * real_tokens
    return flops + 12 * layers * attention * pairs


def mfu(flops, seconds, peak_gflops):
    """Model-FLOPs utilisation: the share of the measured peak that the counted FLOPs reached."""
    return flops / seconds / (peak_gflops * 1e9)
