"""The model registry (``FLEET_MODELS_FILE``): models by name with their defaults and
bounds, a queue per model and service class, and the request rules each model adds."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest

from tasks.errors import ValidationFailed
from tasks.jobs import parse_request
from tasks.registry import RegistryError, load_registry
from tasks.request import RequestBounds, request_model
from tasks.settings import Settings

REGISTRY = """
default = "digits"

[models.digits]
path = "models/digits"
description = "handwritten digits"
width = 32
height = 32
steps = 20
guidance_scale = 3.0

[models.digits.loras]
bold = "models/digits-loras/bold"
mirror = "models/digits-loras/mirror"

[models.digits-int8]
path = "models/digits"
quantize = "int8"
loras = { bold = "models/digits-loras/bold" }

[models.digits-4step]
path = "models/digits-4step"
steps = 4
min_steps = 4
max_steps = 4
guidance_scale = 1.0
schedulers = []
"""


def settings_with(tmp_path: Path, text: str = REGISTRY, **env: object) -> Settings:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return Settings(models_file=str(path), **env)  # type: ignore[arg-type]


def test_without_a_file_the_registry_is_fleet_model_named_after_its_directory():
    registry = load_registry(Settings(model="/somewhere/models/My Model", queue_policies={}))
    assert registry.names == ("my-model",) and registry.default == "my-model"
    model = registry.get(None)
    assert (model.path, model.width, model.steps, model.max_steps) == ("/somewhere/models/My Model", 64, 20, 100)
    assert registry.queues(None) == ["fleet.interactive", "fleet.batch"]


def test_every_entry_takes_the_fleet_wide_settings_it_does_not_set(tmp_path):
    registry = load_registry(settings_with(tmp_path, default_steps=30, dtype="bfloat16"))
    assert registry.names == ("digits", "digits-int8", "digits-4step") and registry.default == "digits"
    digits, int8, distilled = (registry.get(n) for n in registry.names)
    assert (digits.width, digits.steps, digits.guidance_scale, digits.dtype) == (32, 20, 3.0, "bfloat16")
    assert (int8.width, int8.steps, int8.quantize, int8.guidance_scale) == (64, 30, "int8", 7.5)
    assert (distilled.steps, distilled.min_steps, distilled.max_steps, distilled.schedulers) == (4, 4, 4, ())


def test_the_default_model_keeps_the_fleet_s_queues_and_every_other_has_its_own(tmp_path):
    registry = load_registry(settings_with(tmp_path, queue_policies={"fleet.extra": {"max_batch_images": 2}}))
    assert registry.queues("digits") == ["fleet.interactive", "fleet.batch", "fleet.extra"]
    assert registry.queues("digits-int8") == ["fleet.interactive.digits-int8", "fleet.batch.digits-int8"]
    assert registry.queue("digits-4step", "batch") == "fleet.batch.digits-4step"
    assert set(registry.job_queues) == {
        "fleet.interactive", "fleet.batch", "fleet.extra", "fleet.interactive.digits-int8",
        "fleet.batch.digits-int8", "fleet.interactive.digits-4step", "fleet.batch.digits-4step",
    }  # fmt: skip


def test_fleet_default_model_and_fleet_serve_choose_among_the_entries(tmp_path):
    registry = load_registry(settings_with(tmp_path, default_model="digits-4step"))
    assert registry.default == "digits-4step" and registry.queues("digits-4step")[0] == "fleet.interactive"
    (int8,) = registry.served("digits-int8")
    assert int8.quantize == "int8" and [m.name for m in registry.served("")] == ["digits-4step"]
    # several, the first loaded at start; their queues all consumed
    assert [m.name for m in registry.served("digits, digits-int8,digits")] == ["digits", "digits-int8"]
    assert registry.served_queues("digits,digits-int8") == [*registry.queues("digits"), *registry.queues("digits-int8")]
    with pytest.raises(RegistryError, match="FLEET_SERVE names nope, not in the registry"):
        registry.served("digits,nope")
    with pytest.raises(RegistryError, match="default model 'nope'"):
        load_registry(settings_with(tmp_path, default_model="nope"))


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[models.a]\npath = 'x'\ncolour = 'red'\n", "colour"),
        ("[models.A]\npath = 'x'\n", "models.A"),
        ("[models.a]\npath = 'x'\nmin_steps = 10\nmax_steps = 5\n", "not within"),
        ("[models.a]\npath = 'x'\nschedulers = ['Nope']\n", "schedulers"),
        ("models = [", "FLEET_MODELS_FILE"),
    ],
)
def test_a_registry_that_is_not_valid_is_refused_saying_where(tmp_path, text, says):
    with pytest.raises(RegistryError, match=says):
        load_registry(settings_with(tmp_path, text))


def test_a_request_names_a_model_or_gets_the_default_and_its_defaults(tmp_path):
    settings = settings_with(tmp_path)
    spec = parse_request({"prompt": "a handwritten 7"}, settings)
    assert (spec.model, spec.width, spec.height, spec.steps, spec.guidance_scale) == ("digits", 32, 32, 20, 3.0)
    spec = parse_request({"prompt": "a handwritten 7", "model": "digits-4step"}, settings)
    assert (spec.model, spec.steps, spec.guidance_scale, spec.width) == ("digits-4step", 4, 1.0, 64)


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"model": "dall-e-3"}, "model", "one of digits, digits-int8, digits-4step"),
        ({"model": "digits-4step", "steps": 8}, "steps", "from 4 to 4 for model digits-4step"),
        ({"model": "digits-4step", "scheduler": "EulerDiscreteScheduler"}, "scheduler", "null (the model's own)"),
        ({"steps": 101}, "steps", "from 1 to 100"),
        ({"loras": [{"name": "sepia"}]}, "loras", "name one of bold, mirror"),
        ({"model": "digits-int8", "loras": [{"name": "mirror"}]}, "loras", "adapters of model digits-int8: bold"),
        ({"model": "digits-4step", "loras": [{"name": "bold"}]}, "loras", "model digits-4step has no LoRA adapters"),
        ({"loras": [{"name": "bold", "scale": 2.5}]}, "loras", "scale a number from -2 to 2"),
        ({"loras": [{"name": "bold", "weight": 1}]}, "loras", "unknown field"),
        ({"loras": [{"name": "bold"}] * 5}, "loras", "at most 4"),
    ],
)
def test_what_a_model_does_not_accept_is_a_422_naming_the_field(tmp_path, body, field, says):
    with pytest.raises(ValidationFailed, match=re.escape(says)) as refused:
        parse_request({"prompt": "x", **body}, settings_with(tmp_path))
    assert refused.value.field == field


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({"model": "digits-4step", "steps": 4}, True),
        ({"model": "digits-4step", "steps": 5}, False),
        ({"model": "digits-4step", "scheduler": "UniPCMultistepScheduler"}, False),
        ({"model": "digits-4step", "scheduler": None}, True),
        ({"model": "digits", "steps": 50, "scheduler": "UniPCMultistepScheduler"}, True),
        ({"steps": 50}, True),
        ({"model": "nope"}, False),
        ({"loras": [{"name": "mirror", "scale": -0.5}, {"name": "bold"}]}, True),
        ({"model": "digits-int8", "loras": [{"name": "bold", "scale": 2}]}, True),
        ({"model": "digits-int8", "loras": [{"name": "mirror"}]}, False),
        ({"model": "digits-4step", "loras": []}, True),
        ({"model": "digits-4step", "loras": [{"name": "bold"}]}, False),
        ({"loras": [{"name": "bold", "scale": "1"}]}, False),
    ],
)
def test_the_json_schema_says_what_the_api_accepts(tmp_path, body, valid):
    settings = settings_with(tmp_path)
    schema = request_model(RequestBounds.of(settings)).model_json_schema()
    body = {"prompt": "x", **body}
    schema_valid = jsonschema.Draft202012Validator(schema).is_valid(body)
    try:
        parse_request(body, settings)
        accepted = True
    except ValidationFailed:
        accepted = False
    assert schema_valid == accepted == valid


def test_adapters_are_applied_by_name_whatever_the_order_and_a_repeated_one_adds_up(tmp_path):
    """Jobs that ask for the same adapters in another order, or split one adapter's scale
    in two, run the same recipe: they batch together. A scale that comes to 0 is no adapter."""
    settings = settings_with(tmp_path)

    def loras(*given):
        spec = parse_request({"prompt": "a handwritten 7", "loras": list(given)}, settings)
        return [(lora.name, lora.scale) for lora in spec.loras]

    assert loras({"name": "mirror", "scale": 0.5}, {"name": "bold"}) == [("bold", 1.0), ("mirror", 0.5)]
    assert loras({"name": "bold", "scale": 0.5}, {"name": "bold", "scale": 0.5}) == [("bold", 1.0)]
    assert loras({"name": "bold", "scale": 0}, {"name": "mirror", "scale": 1}) == [("mirror", 1.0)]
    assert loras() == [] and parse_request({"prompt": "7"}, settings).loras == ()


def test_the_example_registry_serves_the_models_the_repository_ships():
    root = Path(__file__).resolve().parents[2]
    registry = load_registry(Settings(models_file=str(root / "docs" / "models.example.toml")))
    assert registry.names == ("digits", "digits-int8", "digits-4step")
    for model in registry.models.values():
        assert (root / model.path / "model_index.json").exists(), model.name
        for adapter, path in model.loras:
            assert (root / path / "pytorch_lora_weights.safetensors").exists(), adapter
    assert registry.get("digits").adapters == ("bold", "mirror")
