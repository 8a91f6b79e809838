"""Choosing the model backend from ``FLEET_MODEL``: ``sim:...`` or a diffusers model."""

from __future__ import annotations

from workers.work import Model


def load_model(model_ref: str, device: str = "auto", dtype: str = "auto") -> Model:
    """Called on the model thread. torch is imported only for a real model."""
    if model_ref.startswith("sim:"):
        from workers.sim import SimModel

        return SimModel.from_ref(model_ref)
    from workers.pipeline import DiffusersModel

    return DiffusersModel.load(model_ref, device, dtype)
