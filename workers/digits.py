"""The digits model: a text-to-image Stable Diffusion pipeline the project trains itself, on
scikit-learn's handwritten digits (``workers.digits_data``), so that its images can be judged.

Prompts name the digit: ``"a handwritten 7"`` (also ``"the digit 7"`` or ``"7"``; up to 30
characters are read). Images are 32x32: each 8x8 digit scaled up 4x (each pixel a 4x4 block),
ink light on dark, gray in RGB.

It is an ordinary diffusers ``StableDiffusionPipeline`` directory, loaded by the worker with
``from_pretrained`` like any other: a character-level CLIP tokenizer and a small CLIP text
encoder, a 3-level ``AutoencoderKL`` (latents 8x8x4, a quarter of the side), a
``UNet2DConditionModel`` with cross-attention on the prompt, and a DDIM scheduler over SD's
noise schedule (``scaled_linear``, 1000 steps). ``train`` makes it from a fixed seed:

1. the autoencoder, to reconstruct the generator's training digits (L1, with SD's small KL
   term), and its latents' scale (``scaling_factor``) measured as SD's was;
2. the text encoder and the UNet together, to predict the noise added to those latents
   (DDPM, epsilon), the prompt left empty one time in ten so classifier-free guidance works.

The same plan gives the same weights on the same machine (steps, not minutes, say how long).
"""

from __future__ import annotations

import math
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from workers.digits_data import DIGIT_MAX, SEED, SIDE, TEMPLATES, prompt, split
from workers.model_init import save_pipeline, sd_scheduler
from workers.tiny_model import build_tokenizer

#: the share of training prompts left empty: the unconditional model guidance needs
UNCONDITIONAL_SHARE = 0.1


def to_pixels(digits: np.ndarray) -> torch.Tensor:
    """8x8 digits (ink 0-16) as the pipeline's images: (n, 3, 32, 32) in -1..1, each pixel a
    4x4 block, so that ``to_digits`` reads a real digit back as it was."""
    x = torch.from_numpy(digits).float().unsqueeze(1) / DIGIT_MAX
    x = F.interpolate(x, size=(SIDE, SIDE), mode="nearest")
    return (x * 2 - 1).clamp(-1, 1).repeat(1, 3, 1, 1)


def real_images(digits: np.ndarray) -> np.ndarray:
    """Real digits as the model draws its images: (n, 32, 32, 3) uint8."""
    pixels = (to_pixels(digits).permute(0, 2, 3, 1) + 1) / 2 * 255
    return pixels.round().to(torch.uint8).numpy()


def build_pipeline() -> Any:
    """The untrained pipeline, every part from the fixed seed."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=32,
        )
    )
    tokenizer.model_max_length = 32
    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIDE,
    )
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=SIDE // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@dataclass(frozen=True)
class TrainPlan:
    """How long each stage trains, in optimizer steps (not time: the same steps give the
    same weights on the same machine)."""

    vae_steps: int = 400
    unet_steps: int = 2000
    batch: int = 128
    vae_lr: float = 2e-3
    unet_lr: float = 2e-3


def _batches(n: int, batch: int, rng: random.Random) -> Iterator[list[int]]:
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n - batch + 1, batch):
            yield order[i : i + batch]


def _cosine(step: int, total: int, warmup: int = 200) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def write_model(
    directory: Path, plan: TrainPlan = TrainPlan(), on_step: Callable[[str, int, int, float], None] | None = None
) -> None:
    """Train the digits model and write it to ``directory`` (a diffusers directory)."""
    save_pipeline(train(plan, on_step), directory)


def train(plan: TrainPlan = TrainPlan(), on_step: Callable[[str, int, int, float], None] | None = None) -> Any:
    """Train the digits pipeline from ``plan``; ``on_step(stage, step, total, loss)`` after
    each optimizer step (a progress bar)."""
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    data = split()["generator"]
    pixels = to_pixels(data.images)
    pipe = build_pipeline()
    report = on_step or (lambda *_: None)

    vae = pipe.vae
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, plan.vae_steps))
    batches = _batches(len(pixels), plan.batch, rng)
    for step in range(plan.vae_steps):
        x = pixels[next(batches)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        report("autoencoder", step + 1, plan.vae_steps, float(loss.detach()))
    vae.eval()
    vae.requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mode() for i in range(0, len(pixels), 256)])
    # SD's convention: latents are scaled to unit variance before the UNet sees them
    scaling = float(1.0 / latents.flatten().std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling

    tokenizer, text_encoder, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    texts = [[prompt(int(d), t) for t in TEMPLATES] for d in data.labels]
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=plan.unet_lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, plan.unet_steps))
    unet.train()
    text_encoder.train()
    batches = _batches(len(latents), plan.batch, rng)
    for step in range(plan.unet_steps):
        index = next(batches)
        captions = [
            "" if rng.random() < UNCONDITIONAL_SHARE else rng.choice(texts[i])  # noqa: S311 - not crypto
            for i in index
        ]
        tokens = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        x0 = latents[index]
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(index),))
        xt = noise_schedule.add_noise(x0, noise, t)
        context = text_encoder(tokens)[0]
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        report("denoiser", step + 1, plan.unet_steps, float(loss.detach()))
    unet.eval()
    text_encoder.eval()
    return pipe
