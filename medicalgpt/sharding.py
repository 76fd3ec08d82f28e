"""Sizes read from, and changes made to, weights that DeepSpeed ZeRO-3 may have partitioned.

Under ZeRO-3 each rank holds a slice of every weight and the parameter itself is an empty placeholder: its `shape`
is (0,) outside a gather, and the full shape is `ds_shape`. A vocabulary size read as `weight.shape[0]` is then 0:
distillation skipped cutting a padded teacher to the student's size, and the chunked loss divided by zero. Likewise
a LoRA adapter merged into partitioned weights (a reward model given as its adapter directory to PPO) failed.
"""

import contextlib


def full_shape(weight):
    """The weight's whole shape, also when ZeRO-3 partitioned it (`ds_shape`)."""
    return tuple(weight.ds_shape) if hasattr(weight, "ds_shape") else tuple(weight.shape)


def output_rows(model):
    """Rows of the model's output layer (its padded vocabulary: Qwen2.5-7B 152,064, 0.5B 151,936)."""
    return full_shape(model.get_output_embeddings().weight)[0]


def input_rows(model):
    """Rows of the model's input embeddings."""
    return full_shape(model.get_input_embeddings().weight)[0]


def gathered_for_change(model):
    """Context in which `model`'s ZeRO-3-partitioned weights are whole on every rank and may be changed in place;
    rank 0's changes are partitioned again on exit. Without ZeRO-3 it does nothing. Every rank must enter it."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
