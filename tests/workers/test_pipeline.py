"""The real tiny diffusers pipeline, on CPU: sizes, per-image seeds, determinism, the
per-step callback, and warm-up of each configured shape."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.errors import PipelineError
from tasks.settings import WarmShape
from workers.jobs import encode_png
from workers.lora import WEIGHTS_NAME, random_adapter
from workers.pipeline import DiffusersModel, load_pipeline
from workers.protocol import EngineConfig
from workers.work import CompatKey, ImageWork


@pytest.fixture(scope="module")
def model(tiny_model) -> DiffusersModel:
    return DiffusersModel.load(EngineConfig.one(str(tiny_model), device="cpu"))


def key(model, width=64, height=64) -> CompatKey:
    return CompatKey(model.name, width, height, steps=4, guidance_scale=7.5)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_images_have_the_requested_size(model):
    images = model.run(key(model, 64, 96), [ImageWork("a", None, 1), ImageWork("b", "blurry", 2)])
    assert images.shape == (2, 96, 64, 3) and images.dtype == np.uint8


def test_the_same_seed_gives_the_same_bytes(model):
    first = model.run(key(model), [ImageWork("a cat", None, 42)])[0]
    again = model.run(key(model), [ImageWork("a cat", None, 42)])[0]
    assert encode_png(first) == encode_png(again)


def test_different_seeds_give_different_images(model):
    a, b = model.run(key(model), [ImageWork("a cat", None, 1), ImageWork("a cat", None, 2)])
    assert not np.array_equal(pixels(a), pixels(b))


def test_an_image_does_not_depend_on_its_neighbours_at_the_same_batch_size(model):
    target = ImageWork("a cat", None, 7)
    one = model.run(key(model), [target, ImageWork("a dog", None, 1)])[0]
    two = model.run(key(model), [ImageWork("a boat", "dark", 99), target])[1]
    assert encode_png(one) == encode_png(two)


def test_alone_versus_in_a_batch_of_8_differs_by_at_most_one_level(model):
    target = ImageWork("a cat", None, 7)
    alone = model.run(key(model), [target])[0]
    batched = model.run(key(model), [ImageWork(f"n{i}", None, i) for i in range(7)] + [target])[-1]
    assert np.abs(pixels(alone) - pixels(batched)).max() <= 1


def test_the_images_are_the_bytes_diffusers_would_have_made_as_pil(model):
    job = [ImageWork("a cat", None, 3)]
    ours = model.run(key(model), job)[0]
    theirs = model.pipe(
        prompt=["a cat"], negative_prompt=[""], width=64, height=64, num_inference_steps=4, guidance_scale=7.5,
        generator=[__import__("torch").Generator().manual_seed(3)], output_type="pil",
    ).images[0]  # fmt: skip
    assert np.array_equal(ours, np.asarray(theirs))


def test_the_step_callback_sees_every_step_and_can_stop_the_call(model):
    seen = []
    model.run(key(model), [ImageWork("a", None, 1)], on_step=lambda step, total: seen.append((step, total)) and False)
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]
    stopped = []
    model.run(key(model), [ImageWork("a", None, 1)], on_step=lambda step, total: stopped.append(step) or True)
    assert stopped == [1], "after a stop no further step runs"


def test_warming_records_the_batch_sizes_of_each_shape(model):
    model.warm(WarmShape(64, 64, (1, 2)))
    assert model._warmed[(64, 64)] == [1, 2]


def test_a_missing_model_directory_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="fleet model init"):
        load_pipeline(str(tmp_path / "nothing"), "cpu", None)


def test_a_scheduler_made_from_the_model_s_config_is_the_model_s_own(model):
    """DDIMScheduler by name, made with from_config of the model's DDIM: the same bytes as
    the model's own; another sampler draws another image from the same seed, the same
    one every time, and the model's own scheduler is untouched for the next batch."""
    job = [ImageWork("a cat", None, 5)]
    own = model.run(key(model), job)[0]
    ddim = model.run(CompatKey(model.name, 64, 64, 4, 7.5, "DDIMScheduler"), job)[0]
    assert encode_png(own) == encode_png(ddim)
    for name in ("EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        other = CompatKey(model.name, 64, 64, 4, 7.5, name)
        first, again = model.run(other, job)[0], model.run(other, job)[0]
        assert encode_png(first) == encode_png(again) and not np.array_equal(pixels(first), pixels(own)), name
    assert encode_png(model.run(key(model), job)[0]) == encode_png(own)


def test_an_unknown_scheduler_fails_the_batch_with_a_clear_error(model):
    with pytest.raises(PipelineError, match="unknown scheduler 'Nope'"):
        model.run(CompatKey(model.name, 64, 64, 4, 7.5, "Nope"), [ImageWork("a cat", None, 5)])


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> tuple[tuple[str, str], ...]:
    """Two adapters of seeded random weights, and one whose file is not an adapter."""
    root = tmp_path_factory.mktemp("loras")
    broken = root / "broken" / WEIGHTS_NAME
    broken.parent.mkdir()
    broken.write_bytes(b"not a safetensors file")
    return (
        ("noise", str(random_adapter(tiny_model, root / "noise", seed=1).parent)),
        ("other", str(random_adapter(tiny_model, root / "other", seed=2))),  # the file itself
        ("broken", str(broken.parent)),
    )


def test_adapters_change_the_images_and_switching_never_reloads_the_model(tiny_model, adapters):
    """Each adapter, scale and combination draws its own image from the same seed, the same
    one every time; no adapter is the base model's bytes, before and after; the UNet is
    the same object throughout (set_adapters, not a reload)."""
    model = DiffusersModel.load(EngineConfig.one(str(tiny_model), device="cpu", loras=adapters))
    unet, job = model.pipe.unet, [ImageWork("a cat", None, 5)]

    def run(*loras):
        return model.run(CompatKey(model.name, 64, 64, 4, 7.5, loras=loras), job)[0]

    base = run()
    images = {name: run(*loras) for name, loras in {
        "noise": [("noise", 1.0)], "half": [("noise", 0.5)], "other": [("other", 1.0)],
        "both": [("noise", 1.0), ("other", 1.0)],
    }.items()}  # fmt: skip
    encoded = {encode_png(image) for image in [base, *images.values()]}
    assert len(encoded) == 5, "every adapter, scale and mix draws another image"
    assert encode_png(run()) == encode_png(base), "no adapters: the base model's bytes"
    assert encode_png(run(("noise", 1.0))) == encode_png(images["noise"])
    assert model.pipe.unet is unet


def test_an_adapter_that_fails_to_load_fails_its_batch_and_the_model_carries_on(tiny_model, adapters):
    model = DiffusersModel.load(EngineConfig.one(str(tiny_model), device="cpu", loras=adapters))
    job = [ImageWork("a cat", None, 5)]
    base = model.run(CompatKey(model.name, 64, 64, 4, 7.5), job)[0]
    with pytest.raises(PipelineError, match="LoRA adapter 'broken' could not be loaded from .*broken"):
        model.run(CompatKey(model.name, 64, 64, 4, 7.5, loras=(("broken", 1.0),)), job)
    with pytest.raises(PipelineError, match="no LoRA adapter 'unlisted'"):
        model.run(CompatKey(model.name, 64, 64, 4, 7.5, loras=(("unlisted", 1.0),)), job)
    assert encode_png(model.run(CompatKey(model.name, 64, 64, 4, 7.5), job)[0]) == encode_png(base)
    assert model.run(CompatKey(model.name, 64, 64, 4, 7.5, loras=(("noise", 1.0),)), job).shape == (1, 64, 64, 3)
