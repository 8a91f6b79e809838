"""Int8 weight-only quantization (``FLEET_QUANTIZE=int8``): weights at a quarter of their
bytes, every convolution and linear layer covered, outputs near the float model's, and the
worker's model code serving it with the same bytes for the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from workers.digits_data import SHIPPED, SIDE, prompt
from workers.pipeline import DiffusersModel
from workers.protocol import EngineConfig
from workers.quantize import Int8Conv2d, Int8Linear, module_bytes, quantize_int8, quantize_module
from workers.work import CompatKey, ImageWork


@pytest.mark.parametrize("shape", [(16, 8), (8, 4, 3, 3), (3, 1)])
def test_an_int8_weight_is_within_half_a_step_of_the_float_one_per_output_channel(shape):
    weight = torch.randn(shape) * torch.logspace(-3, 1, shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and q.shape == weight.shape and scale.shape[0] == shape[0]
    assert q.abs().max() <= 127
    assert torch.all((q * scale - weight).abs() <= scale / 2 + 1e-7)


def test_a_zero_weight_stays_zero():
    q, scale = quantize_int8(torch.zeros(4, 3))
    assert torch.equal(q * scale, torch.zeros(4, 3))


def test_every_conv_and_linear_layer_is_replaced_and_still_is_what_it_was():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, stride=2), nn.Flatten(), nn.Sequential(nn.Linear(8 * 4 * 4, 5)))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    assert quantize_module(model) == 2
    assert isinstance(model[0], Int8Conv2d) and isinstance(model[0], nn.Conv2d)
    assert isinstance(model[2][0], Int8Linear) and isinstance(model[2][0], nn.Linear)
    assert torch.allclose(model(x), expected, atol=0.05)
    assert quantize_module(model) == 0  # already done


def test_the_digits_unet_in_int8_is_under_0_3x_its_float32_bytes_and_close_to_it():
    model = DiffusersModel.load(EngineConfig.one(str(SHIPPED), device="cpu"))
    unet = model.pipe.unet
    x, t, context = torch.randn(4, 4, 8, 8), torch.tensor([500] * 4), torch.randn(4, 32, 64)
    with torch.inference_mode():
        expected, before = unet(x, t, context).sample, module_bytes(unet)
        quantize_module(unet)
        got = unet(x, t, context).sample
    assert module_bytes(unet) <= 0.3 * before
    assert not [name for name, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert (got - expected).abs().mean() < 0.02 * expected.abs().mean()


def test_an_int8_pool_serves_the_same_bytes_for_the_same_seed_and_images_near_float32():
    work = [ImageWork(prompt(d), None, d) for d in range(4)]
    key = CompatKey(str(SHIPPED), SIDE, SIDE, 5, 3.0)
    float32 = DiffusersModel.load(EngineConfig.one(str(SHIPPED), device="cpu")).run(key, work)
    int8 = DiffusersModel.load(EngineConfig.one(str(SHIPPED), device="cpu", quantize="int8"))
    images = int8.run(key, work)
    assert np.array_equal(images, int8.run(key, work))
    assert not np.array_equal(images, float32)  # it is not the float model
    assert np.abs(images.astype(int) - float32).mean() < 8  # levels of 255
