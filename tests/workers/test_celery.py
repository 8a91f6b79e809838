"""How a worker in a slot picks its GPU and what its engine is told before torch loads."""

from __future__ import annotations

from tasks.settings import Settings
from workers.celery import engine_config, slot_device


def test_a_slot_takes_the_slot_th_visible_gpu():
    """Slot N is GPU N, or the N-th of CUDA_VISIBLE_DEVICES when the host or runtime set it."""
    assert slot_device(1, None) == "1"
    assert slot_device(1, "4,6") == "6"
    assert slot_device(2, "4,6") == "-1", "more workers than visible GPUs: this one sees none"


def test_the_engine_is_pinned_and_given_its_compile_cache_before_torch_loads(tmp_path):
    """A slotted worker's engine gets CUDA_VISIBLE_DEVICES; compiled mode gets its caches."""
    settings = Settings(worker_slot=1, compile="reduce-overhead", compile_cache_dir=str(tmp_path))
    env = engine_config(settings).environment()
    assert env["CUDA_VISIBLE_DEVICES"] in ("1", "-1") or "," not in env["CUDA_VISIBLE_DEVICES"]
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    assert "CUDA_VISIBLE_DEVICES" not in engine_config(Settings(device="cpu", worker_slot=1)).environment()
