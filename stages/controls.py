"""Stage controls: what mmn finds where the answer is known.

* Planted unit (``controls.plant`` set, stage plant): on the evaluated images whose references
  name the word and whose caption target is its token, the unit's attribution rank (top-1 rate,
  median rank), its exact ablation effect on p(c) (paired test), its receptive field's IoU with
  the word's COCO masks vs a random unit of its layer; its decoded tokens and the filter's
  decision; on the other images, how often it is attributed (false positives)
  (:mod:`mmn.controls.report`).
* Cascading model randomisation (``controls.cascade``): the overlap of the top
  ``controls.top_k`` units by g and the Spearman correlation of g with the trained model's, as
  the MLPs are re-initialised from the top layer down (:mod:`mmn.controls.randomization`).

Writes data/controls_plant.csv (per concept image), data/controls_cascade.csv (per step: means
with CIs over images), data/results/controls.json (full; headline: metrics/controls.json) and
data/info/controls.json.
"""

from __future__ import annotations

from mmn.runner import Run, stage


@stage("controls")
def main(run: Run) -> None:
    import polars as pl
    import torch
    from pycocotools.coco import COCO

    from mmn.controls import randomization as R
    from mmn.controls import report as P
    from mmn.controls.plant import split_by_concept
    from mmn.data.layout import CocoLayout
    from mmn.headline import headline
    from mmn.metrics.iou import coco_mask
    from mmn.models.planted import load_plant
    from mmn.neurons.filter import load_wordlist
    from mmn.pipeline import attributed_layers, build_prefix_lm

    params, cp = run.params, run.params.controls
    caps, att = run.read_parquet("captions"), run.read_parquet("attributions")
    layout = CocoLayout(run.path("coco"))
    plant = load_plant(run.path("plant"))
    plm = build_prefix_lm(params, run.path("projection"), plant=run.path("plant"))
    ad = plm.adapter
    layers = attributed_layers(params, ad.n_layers)
    allowed = torch.zeros(ad.n_layers, ad.d_mlp, dtype=torch.bool)
    allowed[layers] = True
    ap = params.attribute
    full: dict = {"plant": None, "cascade": None}
    per = pl.DataFrame(schema=P.PLANT_IMAGE_SCHEMA)
    if plant is not None:
        yes, no = split_by_concept(layout.captions, plant.word)
        coco = COCO(str(layout.instances_path))
        cat = [c for c in coco.loadCats(coco.getCatIds()) if c["name"] == plant.word]
        masks = {}
        if cat:
            have = set(coco.getImgIds(catIds=[cat[0]["id"]]))
            masks = {i: coco_mask(coco, i, cat[0]["id"]) for i in yes if i in have}
        per = P.plant_images(plm, plant, caps, yes, layout.load_image, allowed, aggregate=ap.aggregate,
                             preactivation=ap.preactivation, masks=masks, quantile=params.iou.quantile,
                             seed=params.seed)
        dec = P.decoded_plant(ad, plm.tokenizer, plant, load_wordlist(run.path("wordlist")), params.decode,
                              params.filter)
        full["plant"] = P.plant_summary(per, dec, P.false_positive_rate(att, caps, no, plant), len(yes), params.seed)
        full["plant"]["unit"] = {"layer": plant.layer, "unit": plant.unit, "word": plant.word,
                                 "strength": plant.strength, "train_auc": plant.train_auc,
                                 "write_mix": plant.write_mix, "write_cos": plant.write_cos,
                                 "gradient_of": plant.gradient_of}
        s = full["plant"]
        run.log(f"plant L{plant.layer}.u{plant.unit} {plant.word!r}: {len(yes)} concept images, {per.height} with the "
                f"word as target; top-1 {s['top1'] and s['top1']['mean']}, median rank {s['median_rank']}; decoded "
                f"{dec['tokens'][:5]} (has the word: {dec['has_word']}, kept: {dec['interpretable']}); false "
                f"positives {s['false_positive']['hits']}/{s['false_positive']['n']}")
    table = pl.DataFrame()
    if cp.cascade:
        df = R.cascade(plm, caps, layout.load_image, allowed, cp.cascade, k=cp.top_k, aggregate=ap.aggregate,
                       preactivation=ap.preactivation, seed=params.seed, max_images=cp.max_images)
        table = R.cascade_table(df, params.seed)
        full["cascade"] = R.cascade_results(table)  # None = skipped: null headline columns
        for r in table.iter_rows(named=True):
            run.log(f"cascade: top {r['layers_randomised']} MLP layers randomised: top-{cp.top_k} overlap "
                    f"{r['overlap']:.3f}, Spearman {r['spearman']:.3f} (n={r['n']})")
    full["n_images"] = int(table["n"][0]) if table.height else per.height
    run.write_csv("plant_out", per, float_precision=6)
    run.write_csv("cascade_out", table, float_precision=6)
    run.write_metrics(full, headline)
    run.write_info({"definitions": {
        "concept_images": "evaluated images whose reference captions name the word or its plural",
        "rank": "1 + allowed units with a strictly higher attribute.aggregate score (attribute.method grad_x_act)",
        "false_positive": "other images with a target where the planted unit is among data/attributions.parquet's",
        "cascade": "MLP parameters of the top n layers replaced by Gaussian noise of their own mean and std"}})
    run.log(f"wrote {run.wrote()}")


if __name__ == "__main__":
    main()
