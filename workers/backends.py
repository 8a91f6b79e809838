"""Choosing the model backend from ``FLEET_MODEL``: ``sim:...`` or a diffusers model."""

from __future__ import annotations

from workers.protocol import EngineConfig
from workers.work import Model


def load_model(config: EngineConfig) -> Model:
    """The config's (first) model, called in the engine. torch is imported only for a real model."""
    if config.model.ref.startswith("sim:"):
        from workers.sim import SimModel

        return SimModel.from_spec(config.model)
    from workers.pipeline import DiffusersModel

    return DiffusersModel.load(config)
