"""peft's LoRA linear layer with fewer passes over the activations: the same function, less elementwise work (after
the matrix products, the largest share of LoRA training's CPU time).

peft's `Linear.forward` (0.21.2) computes `result + lora_B(lora_A(dropout(x))) * scaling`: on every LoRA layer a
float mask from `bernoulli_` scaled by 1/(1-p) times the input, a product by `scaling` and a sum with the base
output, and in backward the product by `scaling` again. Here:

- the dropout mask is a bool tensor drawn from 15 random bits per element (four elements from each 64-bit draw of
  torch's generator, a quarter of the draws `bernoulli_` makes), each element kept with probability 1 - p rounded
  to a multiple of 2**-15 (p = 0.05 keeps 31,130 / 32,768 = 0.950012), and rescaled by the exact inverse of that
  probability, so the dropped input's expectation is still the input;
- both rescalings (1 / keep and `scaling`) go into one `addmm` that adds the adapter's product to the base layer's
  output inside the matrix product.

With dropout 0 the outputs and gradients equal peft's to rounding (tests/train/test_fused_lora.py: outputs,
gradients, the mask's distribution, the identity in eval mode). Plugged in through peft's custom-module mapping
(`LoraConfig._register_custom_module`, peft's documented, experimental way to give a layer type its own LoRA class;
tests/train/test_fused_lora.py fails if peft stops dispatching to it), it subclasses peft's `Linear`, so saving,
loading, merging and the adapter's weights are peft's, and it runs peft's forward wherever it does not apply:
adapters disabled or merged, several active adapters, DoRA and other variants, a LoRA bias, mixed dtypes or
autocast, weights partitioned by DeepSpeed ZeRO-3 (read outside their module's forward, they would be empty)."""

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

MASK_BITS = 15  # random bits per element: each int16 field of a 63-bit draw, its top bit dropped
MASK_LEVELS = 2**MASK_BITS


def use_fused_lora_linear(lora_config):
    """Give `lora_config`'s nn.Linear targets the fused LoRA layer. Not for 4/8-bit models: bitsandbytes' layers
    subclass nn.Linear and need their own LoRA class, so the caller leaves those to peft's dispatch."""
    lora_config._register_custom_module({nn.Linear: FusedLoraLinear})
    return lora_config


def keep_mask(x, keep_levels):
    """A bool tensor shaped like `x`, each element True with probability keep_levels / 2**15, independently."""
    count = x.numel()
    draws = torch.empty((count + 3) // 4, dtype=torch.int64, device=x.device).random_()  # 63 random bits each
    fields = draws.view(torch.int16)[:count].view(x.shape)
    return (fields & (MASK_LEVELS - 1)) < keep_levels


def keep_levels(dropout):
    """How many of the 2**15 mask levels keep an input: 1 - p rounded to a multiple of 2**-15; all of them for
    nn.Identity (no dropout) and for p below 2**-16."""
    return round((1 - dropout.p) * MASK_LEVELS) if type(dropout) is nn.Dropout else MASK_LEVELS


class FusedLoraLinear(LoraLinear):
    def forward(self, x, *args, **kwargs):
        adapter = None if args or kwargs else self._fusable_adapter(x)
        if adapter is None:
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        alpha = self.scaling[adapter]
        dropout = self.lora_dropout[adapter]
        kept = keep_levels(dropout)
        if dropout.training and kept < MASK_LEVELS:
            x = torch.where(keep_mask(x, kept), x, 0.0)
            alpha = alpha * MASK_LEVELS / kept
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
        dropout = self.lora_dropout[adapter]
        if type(dropout) not in (nn.Dropout, nn.Identity):  # a dropout of some other kind: peft's forward runs it
            return None
        if dropout.training and keep_levels(dropout) < 1:
            return None  # p within 2**-16 of 1: nothing would be kept
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        weights = (lora_a.weight, lora_b.weight, self.get_base_layer().weight)
        if lora_b.bias is not None or any(hasattr(w, "ds_id") for w in weights):  # a LoRA bias; ZeRO-3 partitions
            return None
        if any(w.dtype != x.dtype for w in weights) or torch.is_autocast_enabled(x.device.type):
            return None
        return adapter
