"""LoRA adapters for the digits model, trained here so that what they change can be judged
(``fleet model lora digits``), and written as diffusers writes them
(``pytorch_lora_weights.safetensors``, read back with ``load_lora_weights``).

Each adapter is a low-rank update of the UNet's attention projections and its resnets'
convolutions (rank ``RANK``), trained with the base model's own denoising loss on a
transformed copy of the digits it was trained on, every other weight frozen:

- ``bold``: every stroke one pixel wider at 32x32 (a 3x3 max filter), so the ink an image
  holds grows while the digit stays readable;
- ``mirror``: every digit mirrored left to right, so the judge reads it only once flipped
  back.

``random_adapter`` writes an adapter of seeded random weights for any model (the tests'
tiny model): no training, a visible change.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline

#: the layers an adapter updates: attention projections and resnet convolutions
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
RANK = 8
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

#: what each digits adapter learns: a transform of the training digits (n, 1, 32, 32) in 0..1
TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "bold": lambda ink: F.max_pool2d(ink, kernel_size=3, stride=1, padding=1),
    "mirror": lambda ink: torch.flip(ink, dims=[-1]),
}
ADAPTERS = tuple(TRANSFORMS)


@dataclass(frozen=True)
class LoraPlan:
    """How long an adapter trains, in optimizer steps."""

    steps: int = 300
    batch: int = 128
    lr: float = 1e-3


def add_adapter(unet: Any, rank: int = RANK) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter (peft) to ``unet``; its parameters, the only ones left trainable."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TARGETS))
    return [p for p in unet.parameters() if p.requires_grad]


def save_adapter(unet: Any, directory: Path) -> Path:
    """Write ``unet``'s adapter as diffusers does; the weights file's path."""
    from peft.utils import get_peft_model_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(unet)  # peft's keys, which load_lora_weights reads as they are
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers, weight_name=WEIGHTS_NAME)
    return directory / WEIGHTS_NAME


def random_adapter(model_dir: Path, directory: Path, seed: int = 0, scale: float = 0.3) -> Path:
    """An adapter of ``model_dir``'s UNet whose weights are seeded noise (``scale`` their
    spread): it changes every image, reproducibly, with no training."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in add_adapter(unet, rank=4):
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return save_adapter(unet, directory)


def train_adapter(
    name: str,
    base: Path,
    directory: Path,
    plan: LoraPlan = LoraPlan(),
    on_step: Callable[[str, int, int, float], None] | None = None,
) -> Path:
    """Train the digits adapter ``name`` (one of ``ADAPTERS``) on the model at ``base``."""
    from workers.digits import to_pixels
    from workers.digits_data import SEED, TEMPLATES, prompt, split

    transform = TRANSFORMS[name]
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    data = split()["generator"]
    ink = (to_pixels(data.images)[:, :1] + 1) / 2
    pixels = (transform(ink) * 2 - 1).clamp(-1, 1).repeat(1, 3, 1, 1)
    with torch.no_grad():
        vae = pipe.vae
        latents = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mode() for i in range(0, len(pixels), 256)])
        latents = latents * vae.config.scaling_factor
        tokens = pipe.tokenizer(
            [[prompt(int(d), t) for t in TEMPLATES][rng.randrange(len(TEMPLATES))] for d in data.labels],
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        context = pipe.text_encoder(tokens)[0]
    unet, noise_schedule = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
    params = add_adapter(unet)
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)
    unet.train()
    report = on_step or (lambda *_: None)
    for step in range(plan.steps):
        index = torch.tensor(rng.sample(range(len(latents)), plan.batch))
        x0 = latents[index]
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (plan.batch,))
        loss = F.mse_loss(
            unet(noise_schedule.add_noise(x0, noise, t), t, encoder_hidden_states=context[index]).sample, noise
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report(name, step + 1, plan.steps, float(loss.detach()))
    unet.eval()
    return save_adapter(unet, directory)
