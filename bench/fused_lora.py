"""LoRA's linear layer with fewer passes over the activations and a cheaper dropout mask of the same distribution:
peft's outputs and gradients, less elementwise work (the largest share of LoRA training's CPU time after the
matrix products).

peft's `Linear.forward` (0.21.2) computes `result + lora_B(lora_A(dropout(x))) * scaling`: on every LoRA layer
a float mask from `bernoulli_` scaled by 1/(1-p) (`div_`) times the input, then a product by `scaling` and a sum
over the output forward, and the product by `scaling` again in backward. Here each input element is kept with the
same probability 1 - p through a bool mask (uniform floats below 1 - p: cheaper on CPU than `bernoulli_`, and a
byte per element for backward to read), and 1/(1-p) and `scaling` both go into one `addmm` that adds the adapter's
product to the base layer's output inside the matrix product. Algebraically the same function; with dropout 0
the outputs and gradients equal peft's to rounding (tests/train/test_fused_lora.py: outputs, gradients, the
mask's distribution, the identity in eval mode).

A bench-side experiment, not wired into training: its gain on a whole training step is not shown yet (docs/speed.md,
"What changed on the real model"; `bench/lora_step_ab.py` measures it). It is plugged in through peft's custom-module
mapping (`LoraConfig._register_custom_module`, peft's documented, experimental way to give a layer type its own LoRA
class), subclasses peft's `Linear` (saving, loading, merging and the adapter's weights are peft's), and falls back to
peft's forward wherever it does not apply: adapters disabled or merged, several active adapters, DoRA and other
variants, a LoRA bias, mixed dtypes or autocast, and weights partitioned by DeepSpeed ZeRO-3 (read outside their
module's forward, they would be empty)."""

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn


class FusedLoraLinear(LoraLinear):
    def forward(self, x, *args, **kwargs):
        adapter = None if args or kwargs else self._fusable_adapter(x)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        alpha = self.scaling[adapter]
        dropout = self.lora_dropout[adapter]
        if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
            keep = 1.0 - dropout.p
            # Each element kept with probability 1 - p, as nn.Dropout keeps it; a bool mask from uniform floats
            # (exact to 2**-24, as CUDA's dropout draws it) costs less than CPU's float bernoulli_, and backward
            # reads a byte per element instead of a float. The 1 / (1 - p) rescaling moves into addmm's alpha.
            x = x * (torch.rand_like(x) < keep)
            alpha = alpha / keep
        down = lora_a(x)
        out = result.reshape(-1, result.shape[-1])
        fused = torch.addmm(out, down.reshape(-1, down.shape[-1]), lora_b.weight.t(), alpha=alpha)
        return fused.view(result.shape)

    def _fusable_adapter(self, x):
        """The one active adapter when the fused forward computes what peft's would, else None."""
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        adapter = self.active_adapters[0]
        if adapter not in self.lora_A or adapter in self.lora_variant:
            return None
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        weights = (lora_a.weight, lora_b.weight, self.get_base_layer().weight)
        if lora_b.bias is not None or any(hasattr(w, "ds_id") for w in weights):  # a LoRA bias; ZeRO-3 partitions
            return None
        if any(w.dtype != x.dtype for w in weights) or torch.is_autocast_enabled(x.device.type):
            return None
        return adapter


def use_fused_lora_linear(lora_config):
    """Give `lora_config`'s nn.Linear targets the fused LoRA layer. Not for 4/8-bit models (bitsandbytes' layers
    subclass nn.Linear and need their own LoRA class): the caller leaves those to peft's dispatch."""
    lora_config._register_custom_module({nn.Linear: FusedLoraLinear})
    return lora_config
