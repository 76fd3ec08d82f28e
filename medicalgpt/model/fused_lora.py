"""LoRA's linear layer with fewer passes over the activations: the same outputs, gradients and dropout masks as
peft's, less elementwise work (the largest share of LoRA training's CPU time on a small model).

peft's `Linear.forward` (0.21.2) computes `result + lora_B(lora_A(dropout(x))) * scaling`: on every LoRA layer
that is a dropout mask scaled by 1/(1-p) (`bernoulli_`, `div_`, `mul`: three passes over the input), then a
product by `scaling` and a sum (two passes over the output) forward, and the product by `scaling` again in
backward. Here the same mask (the same `bernoulli_` call on the same generator, so a seeded run draws the same
masks) multiplies the input unscaled, and 1/(1-p) and `scaling` both go into one `addmm` that adds the
adapter's product to the base layer's output inside the matrix product: one pass over the input and none over
the output. Algebraically the same function; rounding can differ in the last bits (tests/train/test_fused_lora.py
compares it with peft's layer: outputs, gradients, masks, and the identity in eval mode).

It is plugged in through peft's custom-module mapping (`LoraConfig._register_custom_module`, peft's documented,
experimental way to give a layer type its own LoRA class), subclasses peft's `Linear` (saving, loading, merging
and the adapter's weights are peft's), and falls back to peft's forward wherever it does not apply: adapters
disabled or merged, several active adapters, DoRA and other variants, a LoRA bias, mixed dtypes or autocast,
and weights partitioned by DeepSpeed ZeRO-3 (read outside their module's forward, they would be empty).
"""

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
            # nn.Dropout on CPU draws exactly this mask (ATen's _dropout_impl: empty_like(input).bernoulli_(1 - p)),
            # then divides it by 1 - p: that division moves into addmm's alpha.
            x = x * torch.empty_like(x).bernoulli_(keep)
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
