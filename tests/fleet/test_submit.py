"""``fleet submit`` as a user runs it: the images saved and their paths printed, a refused
job's error and exit status, and Ctrl-C canceling the job it waits on."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
from PIL import Image

from fleet.processes import BIN
from tests.helpers import http

pytestmark = pytest.mark.e2e


def fleet_submit(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "fleet"), "submit", *args], capture_output=True, text=True, timeout=180, env={**os.environ, **env}
    )


def test_it_saves_the_images_prints_their_paths_and_exits_0(api_url, tmp_path):
    result = fleet_submit(
        "a lighthouse at dusk", "-n", "2", "--steps", "4", "--seed", "7", "-o", str(tmp_path), "--api", api_url
    )
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert len(paths) == 2 and all(p.startswith(str(tmp_path)) and p.endswith(".png") for p in paths)
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"


def test_the_api_url_comes_from_the_environment_and_a_refusal_exits_1(api_url):
    result = fleet_submit("a kettle", "--width", "7", FLEET_API_URL=api_url)
    assert result.returncode == 1
    assert "width" in result.stderr and "422" in result.stderr and not result.stdout


def test_no_wait_prints_the_job_id(idle_api):
    result = fleet_submit("later", "--no-wait", "--api", idle_api)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert http.get(f"{idle_api}/v1/jobs/{job_id}", timeout=10).json()["state"] == "QUEUED"
    http.post(f"{idle_api}/v1/jobs/{job_id}/cancel", timeout=10)


def test_ctrl_c_while_it_waits_cancels_the_job_and_exits_130(idle_api, tmp_path):
    process = subprocess.Popen(
        [str(BIN / "fleet"), "submit", "never run", "--api", idle_api, "-o", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = process.stderr.readline()  # "job <id> submitted": it follows the job from now on
        job_id = first.split()[1]
        assert first.strip() == f"job {job_id} submitted"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert f"canceled job {job_id}" in stderr
    assert http.get(f"{idle_api}/v1/jobs/{job_id}", timeout=10).json()["state"] == "CANCELED"
    assert not list(tmp_path.iterdir())
