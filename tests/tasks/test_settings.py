"""Settings that shape the worker: warm shapes parse (or fail naming the format), the warm
default covers every served batch size, and a slot moves the metrics port."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tasks.settings import SWAP_HOLD, Settings, WarmShape


def test_warm_shapes_parse_sizes_and_batch_sizes():
    """``WxH:B,B`` entries separated by spaces or semicolons; batch sizes sorted, unique."""
    assert WarmShape.parse_list("512x512:8,1,8; 768x512:1") == (
        WarmShape(512, 512, (1, 8)),
        WarmShape(768, 512, (1,)),
    )


@pytest.mark.parametrize("text", ["512:1", "512x512", "512x500:1", "512x512:0"])
def test_a_bad_warm_shape_is_refused_at_start_up_with_the_format(text):
    """A malformed FLEET_WARM_SHAPES fails when settings load, saying what is expected."""
    with pytest.raises(ValidationError, match="WIDTHxHEIGHT:BATCH|multiples of 8"):
        Settings(warm_shapes=text)


def test_by_default_every_batch_size_is_warmed_eager_and_the_ends_when_compiled():
    """Eager: the default size at 1..max_batch_images; compiled: at 1 and the max only."""
    eager = Settings(default_width=128, default_height=64, max_batch_images=4)
    assert eager.warm == (WarmShape(128, 64, (1, 2, 3, 4)),)
    compiled = Settings(max_batch_images=8, compile="reduce-overhead")
    assert compiled.warm == (WarmShape(64, 64, (1, 8)),)


def test_a_worker_slot_moves_the_metrics_port_and_zero_stays_off():
    """Slot N serves metrics on the base port + N; port 0 turns metrics off for every slot."""
    assert Settings(worker_metrics_port=9808, worker_slot=2).metrics_port == 9810
    assert Settings(worker_metrics_port=0, worker_slot=2).metrics_port == 0


@pytest.mark.parametrize(("device", "valid"), [("cuda:1", True), ("cuda", True), ("gpu0", False), ("cuda:", False)])
def test_the_device_accepts_an_indexed_cuda_device(device, valid):
    """FLEET_DEVICE takes auto, cpu, mps, cuda or cuda:N and nothing else."""
    if valid:
        assert Settings(device=device).device == device
    else:
        with pytest.raises(ValidationError, match="device"):
            Settings(device=device)


def test_a_worker_of_several_models_holds_jobs_for_each_and_more_when_it_swaps():
    """A batch takes one model's jobs: each served model gets a batch's worth to gather;
    a worker that swaps holds SWAP_HOLD times that, so a swap has work enough to pay for it."""
    assert Settings(max_batch_images=8).task_threads == 16
    assert Settings(max_batch_images=8, serve="a,b").task_threads == 32
    assert Settings(max_batch_images=8, serve="a,b", model_memory_mb=100).task_threads == 32 * SWAP_HOLD
    assert Settings(max_batch_images=8, serve="a", model_memory_mb=100).task_threads == 16
    assert Settings(max_batch_images=8, serve="a,b", worker_threads=5).task_threads == 5
