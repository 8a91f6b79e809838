"""Int8 weight-only quantization of a model's convolutions and linear layers
(``FLEET_QUANTIZE=int8``).

Each weight is kept as int8 with one float scale per output channel (symmetric, the
largest magnitude maps to 127), and turned back into the compute dtype when its layer runs:
the scheme of torchao's ``Int8WeightOnlyConfig``. Biases, norms and embeddings stay as they
were. The weights at rest take a quarter of their float32 bytes; the compute is the same
float convolution or matrix product, so the speed is the model's plus the cost of widening
each weight once per call.

Why this and not a library (measured with the versions the registries offer):

- torchao 0.18's int8 weight-only tensor implements linear layers only: a convolution
  fails with ``NotImplementedError: Int8Tensor dispatch ... aten.convolution``. A UNet's
  weights are mostly convolutions (56% of the digits model's), so linear layers alone leave
  the UNet at 0.67x of its float32 bytes.
- ``torch.ao``'s eager quantization is dynamic for linear layers only; its static mode
  needs ``QuantStub``s written into the model and calibration, its kernels run on the CPU
  only, and it is deprecated in favour of torchao.
- optimum-quanto does quantize convolutions, but it is in maintenance mode (its README
  since November 2025) and would add a dependency with compiled extensions.

About sixty lines of torch cover both layer kinds, on every device, with no dependency.
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` as int8 and its scale per output channel (dim 0), in ``weight``'s dtype:
    ``q * scale`` approximates ``weight`` to within half a scale step."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    scale = (flat.abs().amax(dim=1).float() / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(flat.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return q.reshape(weight.shape), scale.to(weight.dtype).reshape(shape)


class _Int8Weight:
    """The ``weight`` of an int8 layer: widened from ``qweight`` and ``scale`` on read."""

    qweight: torch.Tensor
    scale: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:
        return self.qweight.to(self.scale.dtype) * self.scale


class Int8Linear(_Int8Weight, nn.Linear):  # type: ignore[override]  # weight: read-only by design
    """An ``nn.Linear`` whose weight is stored as int8 (``isinstance`` still holds)."""

    def __init__(self, layer: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        q, scale = quantize_int8(layer.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = layer.bias


class Int8Conv2d(_Int8Weight, nn.Conv2d):  # type: ignore[override]  # weight: read-only by design
    """An ``nn.Conv2d`` whose weight is stored as int8 (``isinstance`` still holds)."""

    def __init__(self, layer: nn.Conv2d):
        nn.Module.__init__(self)
        for name in (
            "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
            "transposed", "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice",
        ):  # fmt: skip
            setattr(self, name, getattr(layer, name))
        q, scale = quantize_int8(layer.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = layer.bias


def quantize_module(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` under ``module`` with its int8 form, in
    place; the number replaced."""
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, (Int8Linear, Int8Conv2d)):
            continue
        if type(child) is nn.Linear:
            setattr(module, name, Int8Linear(child))
            replaced += 1
        elif type(child) is nn.Conv2d:
            setattr(module, name, Int8Conv2d(child))
            replaced += 1
        else:
            replaced += quantize_module(child)
    return replaced


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers: its weights at rest."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
