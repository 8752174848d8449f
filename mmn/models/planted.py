"""A planted unit (a positive control), as the LM loader applies it: the record, its files, and
writing it into an LM. Estimating one from training images is :mod:`mmn.controls.plant`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import Tensor

from mmn.errors import DataError
from mmn.models.adapters import LMAdapter

PLANT_JSON = "plant.json"
PLANT_TENSORS = "plant.safetensors"


class PlantError(DataError):
    """A plant that cannot be estimated or loaded (names the file or the reason)."""


@dataclass(frozen=True)
class Plant:
    """What :func:`apply_plant` writes into the LM, and how it was estimated."""

    layer: int
    unit: int
    word: str
    token_id: int  #: the first token of " word": the target c the unit writes
    strength: float
    gain: float
    read: Tensor  #: Float[Tensor, "d_model"], w
    write: Tensor  #: Float[Tensor, "d_model"], the W_out column
    a_concept: float  #: A1: the unit's mean activation at the concept training images' positions (before scaling)
    residual_norm: float  #: mean norm of the residual stream entering the layer at those positions
    n_concept: int  #: training images naming the word
    n_other: int
    train_auc: float  #: AUC of an image's max-over-positions A, concept vs other training images
    write_mix: float = 0.0  #: share of the gradient direction in the write (0: the word's unembedding only)
    write_cos: float | None = None  #: cosine of the unembedding and gradient directions (None when write_mix is 0)
    gradient_of: str | None = None  #: the gradient's objective, logit | logprob (None when write_mix is 0)


def apply_plant(adapter: LMAdapter, plant: Plant) -> None:
    """Write ``plant`` into the LM (in place); every weight outside the unit stays as it was."""
    if not 0 <= plant.layer < adapter.n_layers or not 0 <= plant.unit < adapter.d_mlp:
        raise PlantError(f"plant at layer {plant.layer}, unit {plant.unit} does not fit this LM "
                         f"({adapter.n_layers} layers of {adapter.d_mlp} units): rerun stage plant")
    if plant.read.shape != (adapter.d_model,):
        raise PlantError(f"plant reads {tuple(plant.read.shape)} but the LM's d_model is {adapter.d_model}: "
                         "rerun stage plant")
    adapter.set_unit(plant.layer, plant.unit, plant.read, plant.gain, plant.write)


def save_plant(folder: Path, plant: Plant | None) -> None:
    """``folder/plant.json`` (``{"plant": null}`` when none) and ``plant.safetensors`` (read, write)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if plant is None:
        (folder / PLANT_JSON).write_text(json.dumps({"plant": None}, indent=1) + "\n")
        return
    meta = {k: v for k, v in asdict(plant).items() if k not in ("read", "write")}
    save_file({"read": plant.read.contiguous(), "write": plant.write.contiguous()}, str(folder / PLANT_TENSORS))
    (folder / PLANT_JSON).write_text(json.dumps({"plant": meta}, indent=1) + "\n")


def load_plant(folder: Path) -> Plant | None:
    """The plant written by :func:`save_plant`, or None (no plant); :class:`PlantError` names the file."""
    from safetensors.torch import load_file

    path = Path(folder) / PLANT_JSON
    try:
        meta = json.loads(path.read_text())["plant"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PlantError(f"{path}: cannot read the plant ({err}); rerun stage plant") from None
    if meta is None:
        return None
    try:
        t = load_file(str(Path(folder) / PLANT_TENSORS))
        return Plant(**meta, read=t["read"], write=t["write"])
    except (OSError, KeyError, TypeError) as err:
        raise PlantError(f"{Path(folder) / PLANT_TENSORS}: cannot read the plant ({err}); rerun stage plant") from None
