"""Language-model losses that never hold the whole [tokens x vocab] logits, and the guard for Liger's GPU kernels.

With Qwen's 151,936-token vocabulary the logits of one 4096-token sequence take 2.5 GB in float32, and their
gradient as much again: more than a 0.5B model's weights. Two ways around it, same loss and gradients:

- trl's SFTTrainer computes the loss through its fused LM head (`trl.trainer.utils.add_fused_lm_head`): a Triton
  kernel on GPU; on CPU its torch fallback scores every position, prompts included, and computes entropy and
  top-1 accuracy for the logs as well.
- `--chunked_loss` (this module): the LM head and cross-entropy run on chunks of the learned positions only. Each
  chunk's gradients (softmax minus the target's one-hot, through the head's matrix) are computed in the forward
  pass right after its loss, while its logits are at hand, and kept: no logits outlive their chunk, none are
  computed twice, and there are fewer passes over them than autograd's log_softmax / nll backward make. Where the
  head's weight cannot be read directly (ZeRO-3 partitions it, a LoRA or modules_to_save wrapper, a bias), each
  chunk but the last runs under activation checkpointing instead. Plain torch, any device; the default on CPU, where
  it is the faster of the two. It logs the loss only (trl's entropy and token accuracy need the fused head).
"""

import functools
import importlib.util
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from medicalgpt.constants import IGNORE_INDEX
from medicalgpt.errors import UsageError
from medicalgpt.sharding import full_shape

logger = logging.getLogger(__name__)

LOGITS_PER_CHUNK = 2**25  # ~128 MB of float32 logits per chunk: 220 tokens of Qwen's vocabulary, 11k of a 3k one


def chunked_lm_loss(hidden_states, lm_head, labels, num_items_in_batch=None, chunk_size=None):
    """Causal-LM cross-entropy of `lm_head(hidden_states)` against `labels` shifted by one, -100 ignored.

    Equal to transformers' loss (`model(..., labels=labels).loss`): the sum over learned tokens divided by their count,
    or by `num_items_in_batch` when given (the Trainer's count over a whole gradient-accumulation step)."""
    targets = labels[:, 1:]
    learned = targets != IGNORE_INDEX
    hidden = hidden_states[:, :-1][learned]
    targets = targets[learned]
    chunk_size = chunk_size or max(1, LOGITS_PER_CHUNK // full_shape(lm_head.weight)[0])  # ZeRO-3: ds_shape
    if reads_plain_weight(lm_head):
        total = LinearCrossEntropy.apply(hidden, lm_head.weight, targets, chunk_size, torch.is_grad_enabled())
    else:
        total = checkpointed_chunks_loss(hidden, lm_head, targets, chunk_size)
    if len(targets) == 0:  # keep the graph connected: an all-masked micro-batch contributes a zero gradient
        total = total + hidden_states.sum() * 0.0
    divisor = num_items_in_batch if num_items_in_batch is not None else learned.sum().clamp(min=1)
    return total / torch.as_tensor(divisor, device=total.device)


def reads_plain_weight(lm_head):
    """Whether the head is a bias-free nn.Linear whose whole weight is at hand (not partitioned by ZeRO-3, not a
    DTensor shard, not wrapped by peft, not placed by accelerate's hooks: `--device_map auto` offloads a weight to
    the meta device and moves it, or the input, only inside the module's forward)."""
    from torch.distributed.tensor import DTensor

    weight = getattr(lm_head, "weight", None)
    return (
        type(lm_head) is nn.Linear
        and lm_head.bias is None
        and not hasattr(lm_head, "_hf_hook")
        and not hasattr(weight, "ds_id")
        and not isinstance(weight, DTensor)
    )


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, chunk by chunk, each chunk's gradients computed
    as soon as its loss is: d loss / d logits = softmax - one_hot(target), for the hidden states through the weight
    and for the weight through the hidden states (when they need it), scaled by the incoming gradient in backward.
    The same products and casts as `F.cross_entropy(lm_head(hidden).float(), ...)`, autocast included: logits in the
    compute dtype then float32, their gradient cast back to the compute dtype for the two products (float32 for
    float16, whose range the unscaled gradients can leave)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, grad_enabled):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        # float16 ends at 65,504: a chunk's gradients, before the division by the token count and a GradScaler's
        # scale (both arrive in backward), overflow it (the head's, summed over the chunk's tokens) or lose their
        # small values, where transformers' (scaled first) do not. So in float16 they are computed in float32 and
        # kept so until backward has scaled them.
        grad_dtype = torch.float32 if dtype == torch.float16 else None
        ctx.input_dtypes = hidden.dtype, weight.dtype
        with torch.autocast(device, enabled=False):
            hidden_in, weight_in = hidden.to(dtype), weight.to(dtype)
            hidden_g, weight_g = (hidden.float(), weight.float()) if grad_dtype else (hidden_in, weight_in)
            # (needs_input_grad says what requires grad, also under no_grad: an eval forward computes none)
            grad_hidden = (
                torch.empty_like(hidden, dtype=grad_dtype) if grad_enabled and ctx.needs_input_grad[0] else None
            )
            grad_weight = (
                torch.zeros_like(weight, dtype=grad_dtype) if grad_enabled and ctx.needs_input_grad[1] else None
            )
            total = hidden.new_zeros((), dtype=torch.float32)
            for start in range(0, len(targets), chunk_size):
                rows = slice(start, start + chunk_size)
                chunk_targets = targets[rows].unsqueeze(1)
                log_probs = torch.log_softmax((hidden_in[rows] @ weight_in.t()).float(), dim=-1)
                total -= log_probs.gather(1, chunk_targets).sum()
                if grad_hidden is None and grad_weight is None:
                    continue
                grad_logits = log_probs.exp_()  # softmax, in place of the log-probabilities
                grad_logits.scatter_add_(1, chunk_targets, grad_logits.new_full(chunk_targets.shape, -1.0))
                grad_logits = grad_logits.to(grad_dtype or dtype)
                if grad_hidden is not None:
                    grad_hidden[rows] = grad_logits @ weight_g
                if grad_weight is not None and grad_weight.dtype == grad_logits.dtype:
                    grad_weight.addmm_(grad_logits.t(), hidden_g[rows])  # no [vocab x hidden] temporary per chunk
                elif grad_weight is not None:  # autocast: a float32 master weight, products in bf16
                    grad_weight += grad_logits.t() @ hidden_g[rows]
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    @once_differentiable  # the gradients are precomputed: a second derivative through them would be wrong
    def backward(ctx, grad_total):
        grads = [
            None if grad is None else (grad * grad_total.to(grad.dtype)).to(dtype)
            for grad, dtype in zip(ctx.saved_tensors, ctx.input_dtypes)
        ]
        return *grads, None, None, None


def checkpointed_chunks_loss(hidden, lm_head, targets, chunk_size):
    """The summed loss through the head module itself (its hooks gather ZeRO-3 weights), each chunk but the last
    under activation checkpointing: backward recomputes one chunk's logits at a time instead of keeping them all."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk_size):
        chunk = (lm_head, hidden[start : start + chunk_size], targets[start : start + chunk_size])
        if start + chunk_size >= len(targets):
            # The last chunk is not recomputed: backward starts with it (autograd runs the latest nodes first), so its
            # logits are freed before any other chunk's are rebuilt, and one chunk of logits at a time still holds.
            # A step whose learned tokens fit in one chunk (the common case with a small vocabulary) recomputes none.
            total = total + _chunk_loss(*chunk)
        else:
            total = total + checkpoint(_chunk_loss, *chunk, use_reentrant=False)
    return total


def _chunk_loss(lm_head, hidden, targets):
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")


def supports_chunked_loss(model):
    """Whether the model's logits are exactly `lm_head(last hidden state)` and its loss plain cross-entropy: no logit
    scaling or soft-capping (Gemma, Granite, Cohere ...), no mixture-of-experts auxiliary loss."""
    config = model.config.get_text_config()
    extras = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "output_router_logits")
    return model.get_output_embeddings() is not None and all(getattr(config, name, None) is None for name in extras)


def resolve_chunked_loss(requested, training_args, model):
    """--chunked_loss as given, else on when training on CPU (where trl's fused LM head runs its slower torch
    fallback) for models whose logits are plain lm_head outputs."""
    if requested is None:
        return training_args.device.type == "cpu" and supports_chunked_loss(model)
    return requested


def add_chunked_lm_head(model, chunk_size=None):
    """Let `model(..., labels=labels, chunked_loss=True)` return its loss from `chunked_lm_loss`, without logits.

    The model's forward is wrapped (not bypassed), so DDP, FSDP and PEFT wrappers around it keep working; without
    `chunked_loss=True` it is the original forward (generation is unchanged)."""
    if not supports_chunked_loss(model):
        raise UsageError(
            f"--chunked_loss does not support {type(model).__name__}: its logits are not plain lm_head outputs "
            "(logit scaling, soft-capping or a mixture-of-experts loss). Use --chunked_loss False."
        )
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original_forward = model.forward

    @functools.wraps(type(model).forward)  # `generate` checks its arguments against the real signature
    def forward(self, *args, chunked_loss=False, labels=None, num_items_in_batch=None, **kwargs):
        if not chunked_loss:
            extra = {"labels": labels, "num_items_in_batch": num_items_in_batch}
            return original_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        hidden_states = self.base_model(*args, **kwargs).last_hidden_state
        labels = labels.to(hidden_states.device)
        loss = chunked_lm_loss(hidden_states, self.get_output_embeddings(), labels, num_items_in_batch, chunk_size)
        return CausalLMOutputWithPast(loss=loss)

    model.forward = types.MethodType(forward, model)
    return model


def check_liger_kernel(training_args):
    """--use_liger_kernel needs a CUDA GPU and the liger-kernel package: fail early with what to do, not deep inside
    Triton. (trl 1.16 applies Liger's layer kernels, RMSNorm/RoPE/SwiGLU; the loss stays trl's fused LM head.)"""
    if not getattr(training_args, "use_liger_kernel", False):
        return
    if not torch.cuda.is_available():
        raise UsageError(
            "--use_liger_kernel needs a CUDA GPU: Liger's kernels are Triton GPU kernels. Leave it off here: the "
            "loss is computed in chunks, without the full logits, anyway (--chunked_loss)."
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise UsageError("--use_liger_kernel needs the liger-kernel package: pip install -r requirements-gpu.txt")
