"""Stage attribute: g = A · dy^c/dA for every MLP unit at every image position, one
forward + one backward pass per batch; keeps "the 100 u_k with highest g" per image:
attribute.rank_by=unit (default) ranks units by their max over image positions of g and
keeps k distinct units (patch = the arg-max patch); rank_by=triple keeps the top k
(layer, unit, patch) triples. attribute.method swaps dy/dA for another multiplier M
(direct_logit: W_U[c]·W_out^k, one forward; integrated_gradients: per layer, the gradient
averaged over attribute.ig_steps path points from 0 to that layer's A, the later layers
computing); then g = A·M and gradient = M. attribute.aggregate=sum scores a unit by Σ_p A·M
instead of the max (the first-order estimate of zeroing it at every image position).

Writes data/attributions.parquet (image_id, rank, layer, unit, patch, g, activation,
gradient, target token, y; activation/gradient at the recorded patch).
"""

from __future__ import annotations

from mmn.runner import Run, stage


@stage("attribute")
def main(run: Run) -> None:
    from mmn.data.layout import CocoLayout
    from mmn.distributed import distributed, gather_frames
    from mmn.neurons.attribution import attribute_captions
    from mmn.pipeline import attributed_layers, build_prefix_lm
    from mmn.quality import check_attributions

    params, ap = run.params, run.params.attribute
    caps = run.read_parquet("captions")
    layout = CocoLayout(run.path("coco"))
    with distributed() as info:
        plm = build_prefix_lm(params, run.path("projection"), dtype=ap.dtype, device=ap.device,
                              plant=run.path("plant"))
        layers = attributed_layers(params, plm.adapter.n_layers)
        part = attribute_captions(caps, layout.load_image, plm, k=ap.k, batch_size=ap.batch_size,
                                  preactivation=ap.preactivation, progress=info.is_main, shard=info.shard,
                                  layers=layers, rank_by=ap.rank_by, method=ap.method, ig_steps=ap.ig_steps,
                                  aggregate=ap.aggregate)
        df = gather_frames(part, info)
    if not info.is_main:
        return
    if info.world > 1:
        run.log(f"merged {info.world} shards")
    df = df.sort(["image_id", "rank"])
    n_img = int(caps["has_noun"].sum())
    check_attributions(df, k=ap.k, n_layers=plm.adapter.n_layers, n_units=plm.adapter.d_mlp,
                       n_patches=plm.encoder.n_patches, layers=layers, rank_by=ap.rank_by, aggregate=ap.aggregate)
    run.write_parquet("out", df)
    run.log(f"{df.height} {ap.rank_by}s for {n_img} images ({caps.height - n_img} without a noun skipped); "
            f"wrote {run.wrote()}")


if __name__ == "__main__":
    main()
