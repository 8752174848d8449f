"""Stage filter: keep units whose top decoded tokens are mostly English words
(>= filter.min_words of filter.top_n, words of >= filter.min_letters letters, SCOWL list).

Writes data/interpretable.parquet (every decoded unit with n_words and the
interpretable flag), data/layer_distribution.csv (plot-ready) and metrics/neurons.json.
"""

from __future__ import annotations

import click

from mmn.cli import log, stage_main
from mmn.io import atomic_file, write_json, write_parquet
from mmn.params import load_params

NAME = "filter"


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--attributions", default="data/attributions.parquet", show_default=True, type=click.Path())
@click.option("--neurons", default="data/neurons.parquet", show_default=True, type=click.Path())
@click.option("--out", default="data/interpretable.parquet", show_default=True, type=click.Path())
@click.option("--layers-out", default="data/layer_distribution.csv", show_default=True, type=click.Path())
@click.option("--metrics", "metrics_out", default="metrics/neurons.json", show_default=True, type=click.Path())
@stage_main(NAME)
def main(params_path: str, attributions: str, neurons: str, out: str, layers_out: str, metrics_out: str) -> None:
    import polars as pl

    from mmn.neurons.filter import apply_filter, load_wordlist, wordlist_info
    from mmn.neurons.summary import layer_distribution, neuron_metrics
    from mmn.quality import check_interpretable

    params = load_params(params_path)
    f = params.filter
    words = load_wordlist(f.wordlist)
    neu = apply_filter(pl.read_parquet(neurons), words, min_words=f.min_words, top_n=f.top_n,
                       min_letters=f.min_letters)
    att = pl.read_parquet(attributions)
    check_interpretable(neu, top_n=params.decode.top_n)
    dist = layer_distribution(att, neu)
    metrics = neuron_metrics(att, neu)
    metrics["wordlist"] = wordlist_info(f.wordlist)
    write_parquet(neu, out)
    with atomic_file(layers_out) as tmp:
        dist.write_csv(tmp)
    write_json(metrics, metrics_out)
    log(NAME, f"{metrics['n_interpretable']} of {metrics['n_units']} units interpretable "
              f"({100 * metrics['kept_fraction']:.1f}%); wrote {out}, {layers_out}, {metrics_out}")


if __name__ == "__main__":
    main()
