"""Stage plant: a planted multimodal neuron (positive control), or none.

With ``controls.plant`` set, one unit of the LM is overwritten so that it reads the concept's
direction at the image positions and writes the concept word (:mod:`mmn.controls.plant`).
The direction is estimated from the TRAINING images (data/coco_train/: those whose captions
name the word against the rest) through the trained projection: never from an evaluated image.
Every later stage builds its LM with it (``dvc exp run -S controls.plant.word=dog ...``).

Writes data/plant/ (plant.json: the plant's settings and diagnostics, or ``{"plant": null}``;
plant.safetensors: its read and write vectors).
"""

from __future__ import annotations

from mmn.runner import Run, stage


@stage("plant")
def main(run: Run) -> None:
    from mmn.controls.plant import estimate_plant
    from mmn.data.layout import CocoLayout
    from mmn.data.split import read_split_info
    from mmn.errors import ParamsError
    from mmn.models.planted import save_plant

    params, cp = run.params, run.params.controls.plant
    with run.out_dir("out") as tmp:
        if cp is None:
            save_plant(tmp, None)
            run.log("no plant (controls.plant: null): the LM as loaded")
            return
        from mmn.pipeline import build_prefix_lm

        split = read_split_info(run.path("train"))
        if not split.held_out:
            raise ParamsError(f"controls.plant: the training images are the evaluated ones (projection.train.data: "
                              f"{split.mode}); the plant's direction must come from held-out training images: "
                              "use projection.train.data split, captions or coco-train")
        layout = CocoLayout(run.path("train"))
        plm = build_prefix_lm(params, run.path("projection"))  # the clean LM: the plant is estimated on it
        p = estimate_plant(plm, layout.captions, layout.load_image, layer=cp.layer, unit=cp.unit, word=cp.word,
                           strength=cp.strength, max_images=cp.max_images, seed=params.seed,
                           write_mix=cp.write_mix, gradient_of=cp.gradient_of, progress=True)
        save_plant(tmp, p)
        run.log(f"planted L{p.layer}.u{p.unit} for {p.word!r} (token {p.token_id}) from {p.n_concept} training images "
                f"naming it vs {p.n_other}: strength {p.strength:g} (residual stream norm there {p.residual_norm:.1f}), "
                f"training AUC of its max activation {p.train_auc:.3f}"
                + (f"; write {p.write_mix:g} gradient of the {p.gradient_of} (its cosine with the unembedding {p.write_cos:.3f})"
                   if p.write_mix else ""))
    run.log(f"wrote {run.wrote()}")


if __name__ == "__main__":
    main()
