"""``fleet bench quality`` end to end on a quickly trained model: every recipe's row with its
figures and intervals, the real row, and the JSON, table and plot it writes."""

from __future__ import annotations

import json

from fleet.bench.quality import Recipe, run, write


def test_a_quality_run_writes_every_recipe_s_row(quick_digits, tmp_path):
    recipes = (
        Recipe("reference", 3),
        Recipe("Euler 2", 2, "EulerDiscreteScheduler"),
        Recipe("bf16", 2, dtype="bfloat16"),
    )
    result = run(str(quick_digits), per_digit=2, recipes=recipes, progress=False)
    write(result, tmp_path / "quality")
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert [row["recipe"]["name"] for row in saved["recipes"]] == ["reference", "Euler 2", "bf16"]
    reference, euler, bf16 = saved["recipes"]
    assert "psnr_db" not in reference and euler["psnr_db"]["value"] > 0
    for row in saved["recipes"]:
        assert row["images"] == 20 and row["images_per_s"] > 0 and row["lone_p50_s"] > 0
        for figure in ("adherence", "frechet", "diversity"):
            assert row[figure]["low"] <= row[figure]["value"] <= row[figure]["high"], (row["recipe"], figure)
    assert saved["judge"]["held_out_accuracy"]["value"] >= 0.95 and saved["real"]["images"] == 397
    table = (tmp_path / "quality.md").read_text()
    assert "| Euler 2 | float32 |" in table and "real held-out digits (397)" in table
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"
