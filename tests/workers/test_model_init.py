"""`fleet model init`: the tiny model unchanged, and the real SD 1.5 / SDXL shapes, counted on the meta device."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from fleet.cli import build_parser, main
from workers.model_init import ARCHES, CLIP_VOCAB, build_pipeline, resolve_device, write_model

# The parameter counts of the published checkpoints (stable-diffusion-v1-5, stable-diffusion-xl-base-1.0).
SD_VAE = 83_653_863
CLIP_L = 123_060_480
REAL_PARAMS = {
    "sd15": {"unet": 859_520_964, "vae": SD_VAE, "text_encoder": CLIP_L},
    "sdxl": {"unet": 2_567_463_684, "vae": SD_VAE, "text_encoder": CLIP_L, "text_encoder_2": 694_659_840},
}
PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def meta_pipeline(request) -> tuple[str, DiffusionPipeline]:
    return request.param, build_pipeline(request.param, device="meta")


def files(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_tiny_is_byte_identical_every_time_and_loads(tmp_path):
    """arch="tiny" writes the same bytes every time, and from_pretrained loads them."""
    assert write_model(tmp_path / "new", arch="tiny")
    assert write_model(tmp_path / "old", arch="tiny")
    assert files(tmp_path / "new") == files(tmp_path / "old")
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "new", local_files_only=True)
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == torch.float32


def test_an_existing_model_is_kept_unless_forced(tmp_path):
    """A second write keeps the model there; force rewrites it."""
    assert write_model(tmp_path, arch="tiny")
    assert not write_model(tmp_path, arch="tiny")
    assert write_model(tmp_path, arch="tiny", force=True)


def test_an_unknown_arch_is_a_clear_error(tmp_path):
    """An unknown arch names the known ones and writes nothing."""
    with pytest.raises(ValueError, match="unknown model arch 'sd3': choose one of tiny, sd15, sdxl"):
        write_model(tmp_path / "model", arch="sd3")
    assert not (tmp_path / "model").exists()


def test_real_arches_have_the_published_parameter_counts(meta_pipeline):
    """sd15 and sdxl components have the real checkpoints' parameter counts, within 1%."""
    arch, pipe = meta_pipeline
    counts = {name: sum(p.numel() for p in pipe.components[name].parameters()) for name in REAL_PARAMS[arch]}
    assert counts == pytest.approx(REAL_PARAMS[arch], rel=0.01)


def test_real_arches_go_through_their_pipeline_class_in_float16(meta_pipeline):
    """The pipeline class accepts the components, which are built in float16 on the asked device."""
    arch, pipe = meta_pipeline
    assert type(pipe) is PIPELINES[arch]
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float16}
    assert pipe.unet.device.type == "meta"
    assert torch.get_default_dtype() == torch.float32


def test_sdxl_unet_takes_the_text_time_conditioning():
    """SDXL's UNet is conditioned on both text encoders (2048 wide) and the pooled text + time ids (2816)."""
    unet = build_pipeline("sdxl", device="meta").unet
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.cross_attention_dim == 768 + 1280
    assert unet.add_embedding.linear_1.in_features == 2816 == 1280 + 6 * 256


def test_the_tokenizer_has_clips_real_vocabulary_size(meta_pipeline):
    """The local tokenizer is padded to 49408 tokens, specials last, so the embeddings have their real shape."""
    _, pipe = meta_pipeline
    tokenizer = pipe.tokenizer
    assert len(tokenizer) == CLIP_VOCAB and tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (CLIP_VOCAB - 2, CLIP_VOCAB - 1)
    assert max(tokenizer("a photo of a cat, 4k").input_ids[1:-1]) < 512
    assert pipe.text_encoder.get_input_embeddings().num_embeddings == CLIP_VOCAB


def test_the_tiny_model_is_always_built_on_the_cpu():
    """tiny ignores --device (its bytes must not depend on the host); the others follow it."""
    assert resolve_device("tiny", "cuda") == "cpu"
    assert resolve_device("sd15", "cpu") == "cpu"
    assert resolve_device("sdxl", "auto") == ("cuda" if torch.cuda.is_available() else "cpu")


def test_the_cli_accepts_every_arch_and_device():
    """`fleet model init` takes --arch tiny|sd15|sdxl and --device, defaulting to tiny on auto."""
    parse = build_parser().parse_args
    assert (parse(["model", "init"]).arch, parse(["model", "init"]).device) == ("tiny", "auto")
    for arch in ARCHES:
        args = parse(["model", "init", "/tmp/m", "--arch", arch, "--device", "cpu", "--force"])
        assert (args.dir, args.arch, args.device, args.force) == ("/tmp/m", arch, "cpu", True)
    with pytest.raises(SystemExit):
        parse(["model", "init", "--arch", "sd3"])


def test_the_cli_writes_the_tiny_model_and_says_so(tmp_path, capsys):
    """`fleet model init DIR` still writes the tiny model, then keeps it."""
    assert main(["model", "init", str(tmp_path)]) == 0
    assert (tmp_path / "model_index.json").exists()
    assert f"wrote tiny model at {tmp_path}" in capsys.readouterr().out
    assert main(["model", "init", str(tmp_path)]) == 0
    assert "kept existing model" in capsys.readouterr().out
