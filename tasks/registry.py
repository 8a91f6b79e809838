"""The model registry: every model a fleet serves, by name, with its recipe and bounds.

A registry is a TOML file (``FLEET_MODELS_FILE``; ``docs/models.example.toml``)::

    default = "digits"            # what a request without "model" gets (else the first)

    [models.digits]
    path = "models/digits"        # a diffusers directory, a hub id, or a sim: spec
    width = 32                    # the default size; steps and guidance too
    height = 32
    steps = 20
    guidance_scale = 3.0

    [models.digits-int8]          # the same weights, another worker pool
    path = "models/digits"
    quantize = "int8"

    [models.digits-4step]         # a distilled model: 4 steps, its own sampler only
    path = "models/digits-4step"
    steps = 4
    min_steps = 4
    max_steps = 4
    guidance_scale = 1.0
    schedulers = []

    [models.digits.loras]         # LoRA adapters a request may apply: name = directory
    bold = "models/digits-loras/bold"

Each entry is also a worker pool: a worker serves the models ``FLEET_SERVE`` names (one, or
several that its engine swaps within ``FLEET_MODEL_MEMORY_MB``), loaded as each entry says
(``path``, ``dtype``, ``quantize``, ``loras``), and consumes their queues
(``Registry.queue``). Without a file the registry is the one model of ``FLEET_MODEL``, named
after its directory ("tiny" for the local default), with the fleet-wide defaults.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.schedulers import SchedulerName
from tasks.settings import DType, Quantization, ServiceClass, Settings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - 3.10
    import tomli as tomllib

#: a model's name: what requests, queues, metrics and logs call it (an adapter's too)
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
ModelName = Annotated[str, Field(pattern=NAME_PATTERN)]
#: What a LoRA adapter's scale may be: negative scales push away from what it learned.
MIN_LORA_SCALE, MAX_LORA_SCALE = -2.0, 2.0
#: The most adapters one request may apply.
MAX_LORAS = 4


class ModelEntry(BaseModel):
    """One model of the registry; every unset field takes the fleet-wide setting."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1)
    description: str = ""
    dtype: DType | None = None  # None: FLEET_DTYPE
    quantize: Quantization | None = None  # None: FLEET_QUANTIZE
    width: int | None = Field(None, ge=8, multiple_of=8)  # the default size
    height: int | None = Field(None, ge=8, multiple_of=8)
    steps: int | None = Field(None, gt=0)  # the default steps
    min_steps: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)  # None: FLEET_MAX_STEPS
    guidance_scale: float | None = Field(None, ge=0, le=50)
    # The schedulers a request may name; None: every one; []: only the model's own.
    schedulers: tuple[SchedulerName, ...] | None = None
    # LoRA adapters a request may apply: name -> a directory (diffusers'
    # pytorch_lora_weights.safetensors) or a .safetensors file, as load_lora_weights reads.
    loras: dict[ModelName, str] = Field(default_factory=dict)


class Model(BaseModel):
    """A registry entry with every default filled in: what the API checks a request
    against and a worker loads."""

    model_config = ConfigDict(frozen=True)

    name: str
    path: str
    description: str
    dtype: DType
    quantize: Quantization
    width: int
    height: int
    steps: int
    min_steps: int
    max_steps: int
    guidance_scale: float
    schedulers: tuple[SchedulerName, ...] | None
    loras: tuple[tuple[str, str], ...] = ()  # (adapter name, where its weights are)

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.loras)

    @model_validator(mode="after")
    def _check(self) -> Model:
        if not self.min_steps <= self.steps <= self.max_steps:
            raise ValueError(f"model {self.name}: steps {self.steps} is not within {self.min_steps}-{self.max_steps}")
        return self


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: ModelName | None = None
    models: dict[ModelName, ModelEntry] = Field(min_length=1)


class RegistryError(ValueError):
    """The registry file cannot be read or is not valid."""


class Registry:
    """The models of one fleet, by name; ``default`` is the one a request without
    ``model`` gets. Queues: the default model's are the fleet's queues as configured
    (``FLEET_QUEUE``, ``FLEET_BATCH_QUEUE``); another model's are those with ``.NAME``
    appended, so a fleet of one model keeps the queues it always had."""

    def __init__(self, models: dict[str, Model], default: str, queues: dict[ServiceClass, str], extra: tuple[str, ...]):
        self.models = models
        self.default = default
        self._queues = queues
        self._extra = extra  # FLEET_QUEUE_POLICIES' other queues: the default model's

    def __contains__(self, name: object) -> bool:
        return name in self.models

    def get(self, name: str | None) -> Model:
        """The model ``name`` (None: the default); ``KeyError`` for an unknown one."""
        return self.models[self.default if name is None else name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.models)

    def queue(self, name: str | None, service_class: ServiceClass) -> str:
        base = self._queues[service_class]
        model = self.default if name is None else name
        return base if model == self.default else f"{base}.{model}"

    def queues(self, name: str | None) -> list[str]:
        """Every queue of model ``name``: one per service class (and, for the default
        model, the other queues ``FLEET_QUEUE_POLICIES`` names)."""
        queues = [self.queue(name, service_class) for service_class in self._queues]
        if name is None or name == self.default:
            queues += self._extra
        return list(dict.fromkeys(queues))

    @property
    def job_queues(self) -> list[str]:
        """Every queue jobs are published to, of every model."""
        return list(dict.fromkeys(queue for name in self.models for queue in self.queues(name)))

    def served(self, serve: str) -> tuple[Model, ...]:
        """The models a worker started with ``FLEET_SERVE=serve`` runs: a comma-separated
        list of names, the first loaded at start (empty: the default model)."""
        names = [name.strip() for name in serve.split(",") if name.strip()] or [self.default]
        unknown = [name for name in names if name not in self.models]
        if unknown:
            raise RegistryError(
                f"FLEET_SERVE names {', '.join(unknown)}, not in the registry ({', '.join(self.models)})"
            )
        return tuple(self.models[name] for name in dict.fromkeys(names))

    def served_queues(self, serve: str) -> list[str]:
        """Every queue of the models ``FLEET_SERVE=serve`` names."""
        return list(dict.fromkeys(queue for model in self.served(serve) for queue in self.queues(model.name)))


def load_registry(settings: Settings) -> Registry:
    """The registry ``settings`` name, read once per file and settings."""
    return _load(settings.models_file, settings.default_model, _Defaults.of(settings))


@dataclass(frozen=True)
class _Defaults:
    """The settings a registry's unset fields take, and the queues it names (the cache key)."""

    model_ref: str
    dtype: DType
    quantize: Quantization
    width: int
    height: int
    steps: int
    max_steps: int
    guidance_scale: float
    queue: str
    batch_queue: str
    policy_queues: tuple[str, ...]

    @classmethod
    def of(cls, settings: Settings) -> _Defaults:
        return cls(
            model_ref=settings.model_ref,
            dtype=settings.dtype,
            quantize=settings.quantize,
            width=settings.default_width,
            height=settings.default_height,
            steps=settings.default_steps,
            max_steps=settings.max_steps,
            guidance_scale=settings.default_guidance_scale,
            queue=settings.queue,
            batch_queue=settings.batch_queue,
            policy_queues=tuple(settings.queue_policies),
        )


@lru_cache(maxsize=8)
def _load(models_file: str, default_model: str, defaults: _Defaults) -> Registry:
    if models_file:
        try:
            parsed = RegistryFile.model_validate(tomllib.loads(Path(models_file).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise RegistryError(f"FLEET_MODELS_FILE {models_file}: {exc}") from exc
        except ValidationError as exc:
            raise RegistryError(f"FLEET_MODELS_FILE {models_file}: {exc}") from exc
        entries = dict(parsed.models)
        default = default_model or parsed.default or next(iter(entries))
    else:
        name = _name_of(defaults.model_ref)
        entries = {name: ModelEntry(path=defaults.model_ref)}
        default = default_model or name
    if default not in entries:
        raise RegistryError(f"the default model {default!r} is not in the registry ({', '.join(entries)})")
    try:
        models = {name: _filled(name, entry, defaults) for name, entry in entries.items()}
    except ValidationError as exc:
        raise RegistryError(str(exc)) from exc
    queues: dict[ServiceClass, str] = {"interactive": defaults.queue, "batch": defaults.batch_queue}
    return Registry(models, default, queues, defaults.policy_queues)


def _filled(name: str, entry: ModelEntry, defaults: _Defaults) -> Model:
    max_steps = entry.max_steps or defaults.max_steps
    return Model(
        name=name,
        path=entry.path,
        description=entry.description,
        dtype=entry.dtype or defaults.dtype,
        quantize=entry.quantize or defaults.quantize,
        width=entry.width or defaults.width,
        height=entry.height or defaults.height,
        steps=entry.steps or min(max(defaults.steps, entry.min_steps), max_steps),
        min_steps=entry.min_steps,
        max_steps=max_steps,
        guidance_scale=defaults.guidance_scale if entry.guidance_scale is None else entry.guidance_scale,
        schedulers=entry.schedulers,
        loras=tuple(sorted(entry.loras.items())),
    )


def _name_of(model_ref: str) -> str:
    """A model's name from where it lives: its directory's (or hub id's) last part,
    lower-cased, characters outside the name pattern as ``-``."""
    last = model_ref.rstrip("/").rsplit("/", 1)[-1].split(":")[-1].lower()
    name = re.sub(r"[^a-z0-9._-]", "-", last).lstrip("._-")[:63]
    return name or "default"
