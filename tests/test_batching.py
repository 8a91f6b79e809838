"""Micro-batching through the real worker, the real tiny pipeline and real Redis: a burst
of compatible jobs runs in fewer, larger batches; different sizes never share a call."""

from __future__ import annotations

import collections

import pytest
import requests

from tests.helpers import submit, wait_done

pytestmark = pytest.mark.e2e


def test_a_burst_of_compatible_jobs_runs_in_fewer_larger_batches(api_url):
    ids = [submit(api_url, prompt=f"burst {i}", seed=i, steps=4) for i in range(12)]
    jobs = [wait_done(api_url, job_id) for job_id in ids]
    assert all(job["state"] == "SUCCEEDED" for job in jobs)
    batches = collections.Counter(job["batch"]["id"] for job in jobs)
    assert len(batches) < len(jobs) / 2
    assert max(job["batch"]["images"] for job in jobs) >= 4
    for job in jobs:
        assert job["batch"]["images"] == batches[job["batch"]["id"]]
        assert job["timings"]["batch_wait_s"] >= 0


def test_jobs_of_different_sizes_never_share_a_batch(api_url):
    shapes = [(64, 64), (64, 128), (128, 64)] * 4
    ids = [submit(api_url, prompt="mixed", width=w, height=h, seed=i, steps=4) for i, (w, h) in enumerate(shapes)]
    jobs = [wait_done(api_url, job_id) for job_id in ids]
    assert all(job["state"] == "SUCCEEDED" for job in jobs)
    sizes_per_batch = collections.defaultdict(set)
    for job in jobs:
        sizes_per_batch[job["batch"]["id"]].add((job["request"]["width"], job["request"]["height"]))
    assert all(len(sizes) == 1 for sizes in sizes_per_batch.values())
    assert len(sizes_per_batch) < len(jobs)


def test_multi_image_jobs_share_a_batch_and_count_their_images(api_url):
    ids = [submit(api_url, prompt="multi", num_images=3, seed=i, steps=4) for i in range(4)]
    jobs = [wait_done(api_url, job_id) for job_id in ids]
    assert all(job["state"] == "SUCCEEDED" and len(job["images"]) == 3 for job in jobs)
    assert all(job["batch"]["images"] <= 8 for job in jobs)
    assert any(job["batch"]["images"] > 3 for job in jobs)


def test_the_worker_exports_batch_metrics_for_prometheus(api_url, worker_metrics_port):
    wait_done(api_url, submit(api_url, prompt="metered", seed=1, steps=4))
    text = requests.get(f"http://127.0.0.1:{worker_metrics_port}/metrics", timeout=10).text
    for name in (
        "fleet_batch_images_count",
        "fleet_batch_wait_seconds_sum",
        "fleet_inference_seconds_sum",
        "fleet_batcher_waiting_images",
        'fleet_jobs_total{state="SUCCEEDED"}',
        "fleet_upload_seconds_count",
    ):
        assert name in text
