"""What the model is asked to do: plain types, no torch, shared by the batcher side and
every model backend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from PIL import Image


@dataclass(frozen=True)
class CompatKey:
    """Jobs that share these can share one model call."""

    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str = "default"


@dataclass(frozen=True)
class ImageWork:
    """One image of a batch: what differs between neighbours."""

    prompt: str
    negative_prompt: str | None
    seed: int


class Model(Protocol):
    """A model backend, driven only from the model thread."""

    name: str

    def run(self, key: CompatKey, images: list[ImageWork]) -> list[Image.Image]: ...

    def warm(self, width: int, height: int) -> None: ...
