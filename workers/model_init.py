"""Model directories for ``fleet model init``: the tiny model, or SD 1.5 / SDXL shapes with random weights.

``sd15`` and ``sdxl`` have the real architectures (configs of stable-diffusion-v1-5 and
stable-diffusion-xl-base-1.0, CLIP vocabulary of 49408 tokens), so a GPU spends the real
time on them, but their weights are random: their images are noise. Nothing is downloaded:
the tokenizers are the tiny model's character-level one, padded to the real vocabulary.
They are built on the target device in float16 and saved as float16 safetensors without a
variant, so ``DiffusionPipeline.from_pretrained(dir, dtype=torch.float16)`` loads them.
The tiny model is always built on the CPU in float32, so every copy is byte-identical.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from workers import tiny_model
from workers.pipeline import Pipeline

ARCHES = ("tiny", "sd15", "sdxl")
MARKER = "model_index.json"
CLIP_VOCAB = 49408
CLIP_LENGTH = 77
SEED = tiny_model.SEED


def resolve_device(arch: str, device: str = "auto") -> str:
    """Where to build ``arch``: the tiny model always on the CPU, the others on CUDA when there is one."""
    if arch == "tiny":
        return "cpu"
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def default_dtype(arch: str) -> torch.dtype:
    return torch.float32 if arch == "tiny" else torch.float16


def build_pipeline(arch: str = "tiny", device: str = "cpu", dtype: torch.dtype | None = None) -> Pipeline:
    """The pipeline of ``arch`` with random weights, its modules created on ``device`` in ``dtype``."""
    _check_arch(arch)
    builders: dict[str, Callable[[], Pipeline]] = {
        "tiny": tiny_model.build_pipeline,
        "sd15": _build_sd15,
        "sdxl": _build_sdxl,
    }
    builder = builders[arch]
    with torch.device(device), _default_dtype(dtype or default_dtype(arch)):
        return builder()


def write_model(
    directory: Path, arch: str = "tiny", force: bool = False, device: str = "auto", dtype: torch.dtype | None = None
) -> bool:
    """Write the ``arch`` pipeline to ``directory``; returns False if a model is already there."""
    _check_arch(arch)
    directory = Path(directory)
    if (directory / MARKER).exists() and not force:
        return False
    save_pipeline(build_pipeline(arch, resolve_device(arch, device), dtype), directory)
    return True


def save_pipeline(pipe: Any, directory: Path) -> None:
    """``pipe.save_pretrained`` into ``directory``, written beside and moved into place
    with ``model_index.json`` last: a half-written model is never loaded."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory.parent) as tmp:
        pipe.save_pretrained(tmp)
        forget_origin(Path(tmp))
        for item in sorted(Path(tmp).iterdir(), key=lambda p: p.name == MARKER):
            target = directory / item.name
            if target.exists():
                _remove(target)
            item.rename(target)


def forget_origin(directory: Path) -> None:
    """Drop ``_name_or_path`` from a saved pipeline's configs: diffusers records there the
    directory a component was loaded from (a distilled model's teacher), which names the
    machine it was made on."""
    for config in [directory / "model_index.json", *directory.glob("*/config.json")]:
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise ValueError(f"unknown model arch {arch!r}: choose one of {', '.join(ARCHES)}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build_sd15() -> StableDiffusionPipeline:
    tokenizer = _clip_tokenizer()
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(SEED)
    vae = _vae(sample_size=512, scaling_factor=0.18215)
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(_clip_l_config(tokenizer))
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


def _build_sdxl() -> StableDiffusionXLPipeline:
    tokenizer = _clip_tokenizer()
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        norm_num_groups=32,
    )
    torch.manual_seed(SEED)
    vae = _vae(sample_size=1024, scaling_factor=0.13025)
    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(_clip_l_config(tokenizer))
    torch.manual_seed(SEED)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            **_special_ids(tokenizer),
            vocab_size=CLIP_VOCAB,
            max_position_embeddings=CLIP_LENGTH,
            hidden_size=1280,
            intermediate_size=5120,
            num_attention_heads=20,
            num_hidden_layers=32,
            projection_dim=1280,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        )
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=sd_scheduler(),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _clip_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        return tiny_model.build_tokenizer(Path(tmp), vocab_size=CLIP_VOCAB)


def _special_ids(tokenizer: CLIPTokenizer) -> dict[str, Any]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _clip_l_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """CLIP ViT-L/14's text encoder: SD 1.5's, and SDXL's first."""
    return CLIPTextConfig(
        **_special_ids(tokenizer),
        vocab_size=CLIP_VOCAB,
        max_position_embeddings=CLIP_LENGTH,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        projection_dim=768,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _vae(sample_size: int, scaling_factor: float) -> AutoencoderKL:
    """Stable Diffusion's VAE: 4 levels, latents 1/8 of the image side with 4 channels."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
    )


def sd_scheduler() -> DDIMScheduler:
    """Stable Diffusion 1.5's DDIM: its noise schedule (``scaled_linear``, 1000 steps) and
    its ``steps_offset=1``."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _remove(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _remove(child)
        path.rmdir()
    else:
        path.unlink()
