"""Build the models a stage needs from the typed params (shared by all stages)."""

from __future__ import annotations

from pathlib import Path

from mmn.models.adapters import LMAdapter
from mmn.models.lm import load_lm, resolve_device
from mmn.models.prefix_lm import ImagePrefixLM
from mmn.models.projection import ProjectionError, load_projection
from mmn.models.vision import PatchEncoder, load_encoder
from mmn.params import Params, ParamsError


def build_lm(params: Params, dtype: str | None = None, device: str | None = None, plant: Path | None = None
             ) -> tuple[LMAdapter, object]:
    """The profile's LM; ``dtype``/``device`` override the profile when given. ``plant``: the
    folder of stage ``plant`` (data/plant); its planted unit, if any, is written into the LM
    (:mod:`mmn.controls.plant`). Every stage after ``plant`` passes it; training does not."""
    m = params.model
    adapter, tok = load_lm(m.lm, revision=m.lm_revision, dtype=dtype or m.dtype, device=device or m.device)
    if plant is not None:
        from mmn.models.planted import apply_plant, load_plant

        p = load_plant(plant)
        if p is not None:
            apply_plant(adapter, p)
    return adapter, tok


def build_encoder(params: Params, device: str | None = None) -> PatchEncoder:
    m = params.model
    return load_encoder(m.encoder, m.encoder_grid, m.image_size, device=resolve_device(device or m.device))


def build_prefix_lm(
    params: Params, projection_dir: Path, dtype: str | None = None, device: str | None = None,
    plant: Path | None = None,
) -> ImagePrefixLM:
    """LM (with stage ``plant``'s unit, :func:`build_lm`) + the projection written by the
    ``load_projection`` stage + the encoder it maps from."""
    adapter, tok = build_lm(params, dtype, device, plant)
    enc = build_encoder(params, device)
    proj, meta = load_projection(projection_dir)
    if proj.in_features != enc.dim or proj.out_features != adapter.d_model:
        raise ProjectionError(
            f"{projection_dir}: projection is Linear({proj.in_features}, {proj.out_features}) but the encoder "
            f"gives {enc.dim} dims and the LM takes {adapter.d_model}; rerun load_projection"
        )
    proj = proj.to(adapter.device)
    return ImagePrefixLM(adapter, tok, proj, prompt=params.caption.prompt, encoder=enc)


def attributed_layers(params: Params, n_layers: int) -> list[int]:
    """``attribute.layers`` checked against the LM (null = every layer)."""
    layers = params.attribute.layers
    if layers is None:
        return list(range(n_layers))
    bad = [x for x in layers if x >= n_layers]
    if bad:
        raise ParamsError(f"attribute.layers: {bad} out of range; {params.model.lm} has layers 0..{n_layers - 1}")
    return list(layers)
