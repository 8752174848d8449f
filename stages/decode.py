"""Stage decode: top tokens of every unit in the attributions: the paper's
decoder(W_out^k), the unembedding times the raw W_out column (decode.lens=unembed; or
final norm + unembedding + head bias with decode.lens=logit_lens), over the tokenizer's
real tokens only, one fp32 matrix product per layer.

Writes data/neurons.parquet (layer, unit, token_ids, tokens, logits, decoded).
"""

from __future__ import annotations

from mmn.runner import Run, stage


@stage("decode")
def main(run: Run) -> None:
    from mmn.neurons.decode import decode_units
    from mmn.pipeline import build_lm
    from mmn.quality import check_neurons

    params = run.params
    att = run.read_parquet("attributions")  # inputs first: a bad file fails before the model loads
    adapter, tok = build_lm(params, dtype="float32", device="cpu", plant=run.path("plant"))
    df = decode_units(adapter, tok, att, top_n=params.decode.top_n, lens=params.decode.lens)
    check_neurons(df, top_n=params.decode.top_n, n_layers=adapter.n_layers, n_units=adapter.d_mlp)
    run.write_parquet("out", df)
    run.log(f"decoded {df.height} distinct units; wrote {run.wrote()}")
    for r in df.head(3).iter_rows(named=True):
        run.log(f"  L{r['layer']}.u{r['unit']}: {r['decoded']}")


if __name__ == "__main__":
    main()
