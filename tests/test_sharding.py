"""Sizes read through DeepSpeed ZeRO-3's partitioning (medicalgpt/sharding.py); the whole path, a padded teacher
distilled under ZeRO-3, is tests/train/test_deepspeed_stages.py."""

import torch

from medicalgpt.sharding import full_shape, gathered_for_change, input_rows, output_rows


class Partitioned(torch.nn.Module):
    """A model as one ZeRO-3 rank holds it: empty weights that carry their whole shape in `ds_shape`."""

    def __init__(self, rows, width):
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(0, width), torch.nn.Linear(width, 0, bias=False)
        self.embed.weight.ds_shape = torch.Size([rows - 64, width])
        self.head.weight.ds_shape = torch.Size([rows, width])

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_sizes_are_the_whole_weights_not_a_ranks_empty_slice():
    model = Partitioned(3072, 16)
    assert model.head.weight.shape[0] == 0  # what distillation read before: the cut to the student's size skipped
    assert (output_rows(model), input_rows(model)) == (3072, 3008)
    assert full_shape(torch.nn.Linear(16, 4).weight) == (4, 16)


def test_weights_are_changed_in_place_without_deepspeed():
    model = torch.nn.Linear(4, 4)
    with gathered_for_change(model):
        model.weight.data.zero_()
    assert model.weight.abs().sum() == 0
