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
    from mmn.neurons.ablation import unit_scores

    a, g = torch.rand(2, 3, 4), torch.rand(2, 3, 4)
    assert unit_scores(a, g).shape == (2, 4)


def test_a_wrong_shape_names_the_mismatched_dimension(checked):
    """Without the check this call broadcasts silently ([2, 3, 4] * [1, 3, 4])."""
    from jaxtyping import TypeCheckError

    from mmn.neurons.ablation import rank_units, unit_scores

    with pytest.raises(TypeCheckError, match="grad") as err:
        unit_scores(torch.rand(2, 3, 4), torch.rand(1, 3, 4))
    assert "layers=2" in str(err.value)  # the dimension sizes bound by the first argument
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
    code = ("import torch\nfrom mmn.neurons.ablation import unit_scores\n"
            "print(tuple(unit_scores(torch.rand(2, 3, 4), torch.rand(1, 3, 4)).shape))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(2, 4)"
