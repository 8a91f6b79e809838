"""The README documents every setting and the test command CI runs."""

from __future__ import annotations

from pathlib import Path

from tasks.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_documented():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"FLEET_{name.upper()}" not in readme]
    assert not missing


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / "README.md").read_text()
    assert "make test" in (ROOT / ".ci" / "run").read_text()
