"""Stage decode: top tokens of every unit in the attributions: the paper's
decoder(W_out^k), the unembedding times the raw W_out column (decode.lens=unembed; or
final norm + unembedding + head bias with decode.lens=logit_lens), over the tokenizer's
real tokens only, one fp32 matrix product per layer.

Writes data/neurons.parquet (layer, unit, token_ids, tokens, logits, decoded).
"""

from __future__ import annotations

import click

from mmn.cli import log, stage_main
from mmn.io import read_parquet, write_parquet
from mmn.params import load_params

NAME = "decode"


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--attributions", default="data/attributions.parquet", show_default=True, type=click.Path())
@click.option("--out", default="data/neurons.parquet", show_default=True, type=click.Path())
@stage_main(NAME)
def main(params_path: str, attributions: str, out: str) -> None:

    from mmn.neurons.decode import decode_units
    from mmn.pipeline import build_lm, seed_everything
    from mmn.quality import check_neurons

    params = load_params(params_path)
    seed_everything(params.seed)
    att = read_parquet(attributions)  # inputs first: a bad file fails before the model loads
    adapter, tok = build_lm(params, dtype="float32", device="cpu")
    df = decode_units(adapter, tok, att, top_n=params.decode.top_n, lens=params.decode.lens)
    check_neurons(df, top_n=params.decode.top_n, n_layers=adapter.n_layers, n_units=adapter.d_mlp)
    write_parquet(df, out)
    log(NAME, f"decoded {df.height} distinct units; wrote {out}")
    for r in df.head(3).iter_rows(named=True):
        log(NAME, f"  L{r['layer']}.u{r['unit']}: {r['decoded']}")


if __name__ == "__main__":
    main()
