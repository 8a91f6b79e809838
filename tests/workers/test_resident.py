"""The models an engine keeps loaded: the most recently used within a memory budget, the
one a batch needs never evicted for itself, each load's cost reported."""

from __future__ import annotations

import pytest

from tasks.errors import PipelineError
from tests.helpers import ModelStub
from workers.protocol import ModelSpec
from workers.resident import ResidentModels, expected_bytes

MIB = 2**20


class Weights(ModelStub):
    def __init__(self, spec: ModelSpec, log: list[str]):
        self.name, self.spec, self.log = spec.key, spec, log
        self.warmed = []

    def warm(self, shape):
        self.warmed.append(shape)

    def weight_bytes(self):
        return int(spec_mib(self.spec) * MIB)

    def release(self):
        self.log.append(f"release {self.name}")


def spec_mib(spec: ModelSpec) -> float:
    return float(spec.ref.split("mem=")[1])


def models(budget_mib: int, *mibs: int) -> tuple[ResidentModels, list[str]]:
    log: list[str] = []
    specs = tuple(ModelSpec(f"sim:a=0,b=0,mem={mib}", name=f"m{i}") for i, mib in enumerate(mibs))

    def load(spec):
        log.append(f"load {spec.key}")
        return Weights(spec, log)

    return ResidentModels(specs, budget_mib * MIB, load), log


def test_models_stay_loaded_while_they_fit_and_the_least_recently_used_goes_first():
    resident, log = models(250, 100, 100, 100)
    for name in ("m0", "m1", "m0"):
        resident.get(name)
    assert resident.resident == ("m1", "m0") and log == ["load m0", "load m1"]
    model, loaded = resident.get("m2")  # m1 is the least recently used
    assert loaded is not None and loaded.model == "m2" and loaded.resident == ("m0", "m2")
    assert log[2:] == ["release m1", "load m2"], "evicted before the newcomer is loaded"
    assert resident.get("m0")[1] is None, "m0 stayed loaded: no load, no cost"


def test_a_budget_smaller_than_a_model_keeps_just_the_one_in_use():
    resident, log = models(50, 100, 100)
    resident.get("m0")
    resident.get("m1")
    resident.get("m0")
    assert resident.resident == ("m0",) and log == ["load m0", "release m0", "load m1", "release m1", "load m0"]


def test_no_budget_keeps_every_model_and_an_unknown_one_is_a_clear_error():
    resident, log = models(0, 1000, 1000)
    resident.get("m0")
    resident.get("m1")
    assert resident.resident == ("m0", "m1")
    with pytest.raises(PipelineError, match="does not serve model 'm9'"):
        resident.get("m9")


def test_a_model_never_loaded_is_expected_to_take_its_weight_files_on_disk(tiny_model):
    files = [f for f in tiny_model.rglob("*.safetensors")]
    assert files and expected_bytes(ModelSpec(str(tiny_model))) == sum(f.stat().st_size for f in files)
    assert expected_bytes(ModelSpec("sim:a=0,b=0,mem=3")) == 3 * MIB
