"""SFT packing: several conversations share a row, `position_ids` restart at each one, attention never crosses them.

Built from trl's own pieces: `pack_dataset` (best-fit-decreasing bins, no conversation is ever cut) and
`DataCollatorForLanguageModeling` (position_ids from the bins' `seq_lengths`). Two layouts, by attention kernel:

- varlen kernels (flash_attention_2/3): trl's packing as it is. The batch's bins are flattened into one (1, N) row
  with `cu_seq_lens`; the kernel attends inside each conversation only, at a cost of sum(L_i^2).
- mask-based kernels (sdpa, eager): each bin stays a row of the batch and no `attention_mask` is passed, so
  transformers builds a block-diagonal causal mask from the position_ids resets. These kernels compute the whole
  masked square, so flattening B bins into one row would cost (B*L)^2; rows cost B*L^2, like padded batches, with
  almost no padding. On sdpa on CPU the rows get "packed_sdpa" (medicalgpt/train/packed_attention.py): each
  conversation attends on its own, so the mask's empty blocks are never computed.

`--packing` left unset packs when the model is one of transformers' own classes, its attention is one of those
four (sdpa and eager are checked on CPU in tests/train/test_packing.py: packed and unpacked logits and losses are
equal; the flash kernels' varlen path is trl's own) and, tried on two short sequences before training, the second
one's logits do not depend on the first (`keeps_packed_sequences_apart`); any other model trains on padded batches
unless `--packing True` is given.
"""

import logging
from dataclasses import dataclass

import torch
from transformers.integrations import is_deepspeed_zero3_enabled
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from medicalgpt.constants import IGNORE_INDEX
from medicalgpt.model.loader import fsdp_requested
from medicalgpt.processors.sft import sequence_lengths
from medicalgpt.train.packed_attention import use_packed_sdpa

logger = logging.getLogger(__name__)

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")
MASKED_ATTENTION = ("sdpa", "eager")


def honours_position_resets(model):
    """Whether `model`'s attention keeps packed conversations apart from their position_ids alone."""
    config = model.config
    own_class = type(model).__module__.startswith("transformers.")
    return own_class and config._attn_implementation in VARLEN_ATTENTION + MASKED_ATTENTION


def can_run_forward(model):
    """Whether `model` can run a forward before the Trainer wraps it, decided alike on every rank: not under ZeRO-3
    (weights partitioned) or FSDP (its CPU-RAM-efficient loading gives ranks > 0 meta tensors until FSDP wraps the
    model; were rank 0 alone to try, ranks would build different batches), nor where weights are meta or
    partitioned anyway, nor on a 4/8-bit model (bitsandbytes 0.50 repacks 4-bit weights for inference on a CPU
    forward in eval mode, which its training path then cannot use). There the default follows the model's class and
    kernel alone."""
    if is_deepspeed_zero3_enabled() or fsdp_requested() or getattr(model, "hf_quantizer", None) is not None:
        return False
    return not any(p.device.type == "meta" or hasattr(p, "ds_id") for p in model.parameters())


def keeps_packed_sequences_apart(model, length=8):
    """Whether `model` as loaded keeps two sequences packed in one row apart: the second one's logits do not depend
    on the first. Two forwards of 2 x `length` tokens without gradients; catches the layers that carry state along a
    row (linear attention, Mamba, convolutions: Qwen3.5, Jamba, LFM2...) and models that build their mask without
    the position_ids (OPT), which transformers' classes and kernels alone do not tell apart."""
    vocab = model.config.get_text_config().vocab_size
    device = next(model.parameters()).device
    steps = torch.arange(length, device=device)
    second = (7 * steps + 11) % vocab
    firsts = [(3 * steps + 5) % vocab, (13 * steps + 101) % vocab]
    positions = steps.repeat(2)[None]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            logits = [
                model(input_ids=torch.cat([first, second])[None], position_ids=positions, use_cache=False)
                .logits[0, length:]
                .float()
                for first in firsts
            ]
    finally:
        for module, training in modes.items():
            module.training = training
    # Kept apart, the second sequence's logits come out of the same products on the same inputs: equal, bit for bit on
    # CPU. The margin is for kernels that round differently from call to call; leaks (XGLM's ~1e-3 on a random tiny
    # model) stay above it.
    return bool((logits[0] - logits[1]).abs().max() <= 1e-5 * (1 + logits[0].abs().max()))


def resolve_packing(training_args, model):
    """Decide how SFT batches are built: "trl" (trl's own packing), "rows" (packed rows, see `pack_rows`),
    "padding_free" (one flattened row per batch, varlen kernels) or "off" (padded batches).

    Sets `training_args.packing`, `padding_free` and `max_length` to what SFTTrainer must see: for "rows" the datasets
    are packed here, so the trainer gets `packing=False`, and a model on sdpa training on CPU is switched to
    "packed_sdpa".
    Conversations are already cut to `max_length` by whole turns in preprocessing, so padding-free batches need no
    truncation of their own (`max_length=None`)."""
    attention = model.config._attn_implementation
    honours = honours_position_resets(model)
    why = "is not known to keep packed conversations apart"
    if honours and training_args.packing is None and can_run_forward(model):
        honours = keeps_packed_sequences_apart(model)
        why = "mixed two sequences packed in one row when tried"
    requested = honours if training_args.packing is None else training_args.packing
    if training_args.packing is None and not honours:
        logger.warning(
            "Packing is off: %s with attention %r %s. Pass --packing True if it does keep them apart.",
            type(model).__name__,
            attention,
            why,
        )
    if not requested:
        training_args.packing = False
        if training_args.padding_free or (honours and attention in VARLEN_ATTENTION):
            training_args.padding_free, training_args.max_length = True, None
            return "padding_free"
        return "off"
    if attention in VARLEN_ATTENTION or training_args.padding_free or training_args.packing_strategy != "bfd":
        training_args.packing = True
        return "trl"
    training_args.packing = False
    if training_args.device.type == "cpu":  # measured there; on GPUs (sdpa without flash-attn) not yet
        use_packed_sdpa(model)
    return "rows"


def pack_rows(dataset, max_length, num_proc=None, desc=""):
    """Conversations -> rows of up to `max_length` tokens (best fit decreasing) with their `seq_lengths`.

    Rows are as long as the longest conversation (at most `max_length`): on mask-based kernels a row's attention costs
    its length squared, so rows no longer than needed keep short conversations cheap."""
    lengths = sequence_lengths(dataset)
    longest = max(lengths, default=max_length or 1)
    row_length = min(max_length, longest) if max_length else longest
    packed = pack_dataset(
        dataset.select_columns(["input_ids", "labels"]), row_length, "bfd", {"num_proc": num_proc, "desc": desc}
    )
    tokens = sum(lengths)
    logger.debug(
        "Packed %d conversations into %d rows of up to %d tokens (%.1f%% of the rows' tokens are padding).",
        len(dataset),
        len(packed),
        row_length,
        100 * (1 - tokens / max(1, len(packed) * row_length)),
    )
    return packed


@dataclass
class PackedRowsCollator(DataCollatorForLanguageModeling):
    """trl's collator for packed rows kept as rows: position_ids restart at every conversation (and are 0 on padding),
    no attention_mask, so transformers masks attention per conversation. The first token of each conversation is
    never a target: it would be predicted from the end of the previous one (trl's padding-free collator does the
    same). `use_cache=False` is part of the batch: transformers only looks for position resets without a KV cache,
    and a model called in eval mode makes one unless told not to."""

    return_position_ids: bool = True

    def torch_call(self, examples):
        batch = super().torch_call(examples)
        del batch["attention_mask"]
        batch["labels"][batch["position_ids"] == 0] = IGNORE_INDEX
        batch["use_cache"] = False
        return batch
