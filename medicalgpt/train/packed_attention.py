"""sdpa for packed rows, one conversation at a time: what a block-diagonal mask computes, without its empty blocks.

A packed row (medicalgpt/train/packing.py) is several conversations whose `position_ids` restart at each one. Plain
sdpa gets a dense block-diagonal mask from transformers and computes the whole row's square; the CPU kernel (and the
GPU ones given a mask) cannot skip the blocks the mask empties, so a 1,024-token row of four conversations pays ~4x
the attention it needs. "packed_sdpa" splits each row at the position resets and runs sdpa with `is_causal` on every
conversation: same outputs (tests/train/test_packed_attention.py), ~2.5x faster attention forward and backward on
such rows (docs/speed.md).

Registered through transformers' public extension points (`AttentionInterface`, `AttentionMaskInterface`; the
functions' signatures read from transformers 5.23). Anything that is not a whole packed row without a padding mask
(a padding mask, a KV cache, one query token) goes to transformers' own sdpa with the mask transformers built.
"""

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "packed_sdpa"


def packed_sdpa_mask(*args, attention_mask=None, q_offset=0, kv_offset=0, q_length=None, kv_length=None, **kwargs):
    """No mask for whole rows without padding (the attention splits them itself), transformers' sdpa mask else."""
    if attention_mask is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
        return None
    return sdpa_mask(
        *args,
        attention_mask=attention_mask,
        q_offset=q_offset,
        kv_offset=kv_offset,
        q_length=q_length,
        kv_length=kv_length,
        **kwargs,
    )


def row_pieces(position_ids, batch_size):
    """The pieces of `batch_size` rows laid end to end, as (length, alone): a conversation starts where the position
    does not follow the one before it. Consecutive 1-token conversations (a row's padding, at position 0) make one
    piece whose tokens each attend to themselves alone (`alone`), so padding costs one call, not one per token."""
    positions = position_ids.expand(batch_size, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    offsets = starts.flatten().nonzero().flatten().tolist() + [positions.numel()]
    pieces = []
    for length in (end - start for start, end in zip(offsets, offsets[1:])):
        if length == 1 and pieces and pieces[-1][1]:
            pieces[-1][0] += 1
        else:
            pieces.append([length, length == 1])
    return [tuple(piece) for piece in pieces]


def packed_sdpa_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """query [batch, heads, length, dim], key and value [batch, kv_heads, length, dim] -> [batch, length, heads,
    dim]."""
    batch, _, length, _ = query.shape
    whole_rows = attention_mask is None and position_ids is not None and key.shape[2] == length > 1
    pieces = row_pieces(position_ids, batch) if whole_rows else []
    if len(pieces) <= batch:  # one conversation per row (or not a packed row): sdpa as transformers runs it
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    lengths = [n for n, _ in pieces]
    split = [tensor.transpose(1, 2).flatten(0, 1).split(lengths) for tensor in (query, key, value)]
    outputs = []
    for (n, alone), *qkv in zip(pieces, *split):
        mask = torch.eye(n, dtype=torch.bool, device=query.device) if alone else None  # each token attends itself
        qkv = (piece.transpose(0, 1)[None] for piece in qkv)  # a batch of one: [1, heads, n, dim]
        output, _ = sdpa_attention_forward(module, *qkv, mask, is_causal=mask is None, **kwargs)
        outputs.append(output)  # [1, n, heads, dim]
    return torch.cat(outputs, dim=1).view(batch, length, *outputs[0].shape[2:]), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)


def all_layers_full_attention(config):
    """Whether every layer attends to its whole past: a sliding window is a mask this attention would drop."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None


def use_packed_sdpa(model):
    """Switch a model on sdpa with full attention in every layer to "packed_sdpa"; True if it was switched. The
    choice is not saved with the model (transformers keeps the attention implementation out of config.json)."""
    if model.config._attn_implementation != "sdpa" or not all_layers_full_attention(model.config):
        return False
    model.set_attn_implementation(PACKED_SDPA)
    return model.config._attn_implementation == PACKED_SDPA
