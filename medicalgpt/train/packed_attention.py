"""sdpa for packed rows, one conversation at a time: what a block-diagonal mask computes, without its empty blocks.

A packed row (medicalgpt/train/packing.py) is several conversations whose `position_ids` restart at each one. Plain
sdpa gets a dense block-diagonal mask from transformers and computes the whole row's square; the CPU kernel (and the
GPU ones given a mask) cannot skip the blocks the mask empties, so a 1,024-token row of four conversations pays ~4x
the attention it needs. "packed_sdpa" splits each row at the position resets and runs sdpa with `is_causal` on every
conversation: same outputs (tests/train/test_packed_attention.py), less time (docs/speed.md, bench/
packed_attention_ab.py).

Registered through transformers' public extension points (`AttentionInterface`, `AttentionMaskInterface`; the
functions' signatures read from transformers 5.23). transformers builds its own sdpa mask as for "sdpa"; a layer
splits only when that mask is exactly the block-diagonal causal mask its `position_ids` imply (checked once per
forward). Anything else (a padding mask, a KV cache, a sliding window, bidirectional attention, a model that does not
hand `position_ids` to its attention, a position bias, one query token) runs transformers' own sdpa with
transformers' mask.
"""

import weakref

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "packed_sdpa"


def sequence_starts(position_ids, batch_size):
    """[batch, length] bool: where a sequence starts, as transformers finds packed sequences (`masking_utils.
    find_packed_sequence_indices`): the first token of a row and every position that does not follow the one before."""
    positions = position_ids.expand(batch_size, -1)
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[:, 1:] = positions[:, 1:] - positions[:, :-1] != 1
    return starts


def row_pieces(starts):
    """The pieces of the rows laid end to end, as (length, alone). Consecutive 1-token sequences (a row's padding, at
    position 0) make one piece whose tokens each attend to themselves alone (`alone`): one call, not one per token."""
    offsets = starts.flatten().nonzero().flatten().tolist() + [starts.numel()]
    pieces = []
    for length in (end - start for start, end in zip(offsets, offsets[1:])):
        if length == 1 and pieces and pieces[-1][1]:
            pieces[-1][0] += 1
        else:
            pieces.append([length, length == 1])
    return [tuple(piece) for piece in pieces]


_last_check = (None, None, None)  # (the mask, the position_ids, their pieces): every layer of a forward gets the same


def packed_pieces(attention_mask, position_ids, batch, length):
    """The rows' pieces when `attention_mask` is exactly the block-diagonal causal mask `position_ids` imply, else
    None."""
    global _last_check
    mask_ref, positions_ref, pieces = _last_check
    if mask_ref is not None and mask_ref() is attention_mask and positions_ref() is position_ids:
        return pieces
    pieces = None
    if attention_mask.dtype == torch.bool and attention_mask.shape == (batch, 1, length, length):
        starts = sequence_starts(position_ids, batch)
        sequence = starts.cumsum(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=starts.device).tril()
        expected = (sequence[:, :, None] == sequence[:, None, :]) & causal
        pieces = row_pieces(starts) if torch.equal(attention_mask[:, 0], expected) else None
    _last_check = (weakref.ref(attention_mask), weakref.ref(position_ids), pieces)
    return pieces


def packed_sdpa_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """query [batch, heads, length, dim], key and value [batch, kv_heads, length, dim] -> [batch, length, heads,
    dim]."""
    batch, _, length, _ = query.shape
    pieces = None
    whole_row_bias = kwargs.get("position_bias") is not None  # an additive [batch, heads, L, L] bias: not split here
    if attention_mask is not None and position_ids is not None and key.shape[2] == length > 1 and not whole_row_bias:
        pieces = packed_pieces(attention_mask, position_ids, batch, length)
    if pieces is None:  # not a packed row: sdpa as transformers runs it
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
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)  # transformers' masks, as for "sdpa"


def use_packed_sdpa(model):
    """Switch a model on sdpa to "packed_sdpa"; True if it was switched. The choice is not saved with the model
    (transformers keeps the attention implementation out of config.json)."""
    if model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(PACKED_SDPA)
    return model.config._attn_implementation == PACKED_SDPA
