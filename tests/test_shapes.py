"""The tensor shapes in the signatures of mmn.neurons, mmn.models and mmn.metrics are checked
while the tests run: pyproject.toml's pytest ``addopts`` pass ``--jaxtyping-packages`` (jaxtyping's
pytest plugin), which installs jaxtyping's import hook with beartype before any conftest imports
mmn. Production runs (the DVC stages) import the same modules unchecked."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
CHECKED = ["mmn.neurons", "mmn.models", "mmn.metrics"]


def test_pytest_config_enables_the_checks():
    opts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert f"--jaxtyping-packages={','.join(CHECKED)},beartype.beartype" in opts


@pytest.fixture
def checked(pytestconfig):
    value = pytestconfig.getoption("jaxtyping_packages")
    if not value:
        pytest.skip("run without --jaxtyping-packages (pyproject.toml's addopts overridden)")
    assert value.split(",")[:-1] == CHECKED


def test_a_consistent_call_passes(checked):
    from mmn.neurons.ablation import rank_units

    scores = torch.tensor([[0.1, 0.9, 0.3, 0.0], [0.5, 0.2, 0.8, 0.4]])
    assert rank_units(scores, allowed=torch.ones(2, 4, dtype=torch.bool), limit=2) == [(0, 1), (1, 2)]


def test_a_wrong_shape_names_the_mismatched_dimension(checked):
    """A mask of another width names the parameter and the sizes bound by the first argument."""
    from jaxtyping import TypeCheckError

    from mmn.neurons.ablation import rank_units

    with pytest.raises(TypeCheckError, match="allowed") as err:
        rank_units(torch.rand(2, 4), allowed=torch.ones(2, 5, dtype=torch.bool))
    assert "d_mlp=4" in str(err.value)
    with pytest.raises(TypeCheckError, match="allowed"):
        rank_units(torch.rand(2, 4), allowed=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeCheckError, match="allowed"):  # dtype too: a mask must be Bool
        rank_units(torch.rand(2, 4), allowed=torch.ones(2, 4))


def test_return_values_and_dataclasses_are_checked(checked):
    from jaxtyping import TypeCheckError

    from mmn.neurons.attribution import TopK

    i, f = torch.arange(3), torch.rand(3)
    TopK(i, i, i, f, f, f)
    with pytest.raises(TypeCheckError):
        TopK(i, i, i, f, f, torch.rand(4))  # k differs between fields


def test_production_imports_are_unchecked():
    """A plain interpreter (as a DVC stage runs) gets the undecorated functions: no check, no cost."""
    code = ("import torch\nfrom mmn.neurons.attribution import TopK\n"
            "i, f = torch.arange(3), torch.rand(3)\n"
            "print(tuple(TopK(i, i, i, f, f, torch.rand(4)).gradient.shape))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(4,)"  # built without a check (k differs between fields)
