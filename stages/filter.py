"""Stage filter: keep units whose top decoded tokens are mostly English words
(>= filter.min_words of filter.top_n, words of >= filter.min_letters letters, SCOWL list).

Every count is over units: an image's top units are its distinct (layer, unit), the
kept fraction is the share of them that are interpretable (per image, then a bootstrap
CI over images), the layer histogram counts (image, unit) pairs.

Writes data/interpretable.parquet (every decoded unit with n_words and the
interpretable flag), data/layer_distribution.csv (plot-ready: layer, n_units,
n_interpretable_units, share), metrics/neurons.json (numbers only) and
data/info/filter.json (word list path/hash and the definitions used).
"""

from __future__ import annotations

import click

from mmn.cli import log, stage_main
from mmn.io import atomic_file, read_parquet, write_json, write_parquet
from mmn.params import load_params

NAME = "filter"


@click.command(help=__doc__)
@click.option("--params", "params_path", default="params.yaml", show_default=True, type=click.Path())
@click.option("--attributions", default="data/attributions.parquet", show_default=True, type=click.Path())
@click.option("--neurons", default="data/neurons.parquet", show_default=True, type=click.Path())
@click.option("--out", default="data/interpretable.parquet", show_default=True, type=click.Path())
@click.option("--layers-out", default="data/layer_distribution.csv", show_default=True, type=click.Path())
@click.option("--metrics", "metrics_out", default="metrics/neurons.json", show_default=True, type=click.Path())
@click.option("--info", "info_out", default="data/info/filter.json", show_default=True, type=click.Path())
@stage_main(NAME)
def main(params_path: str, attributions: str, neurons: str, out: str, layers_out: str, metrics_out: str,
         info_out: str) -> None:

    from mmn.neurons.filter import apply_filter, load_wordlist, wordlist_info
    from mmn.neurons.summary import layer_distribution, neuron_metrics
    from mmn.quality import check_interpretable

    params = load_params(params_path)
    f = params.filter
    words = load_wordlist(f.wordlist)
    neu = apply_filter(read_parquet(neurons), words, min_words=f.min_words, top_n=f.top_n,
                       min_letters=f.min_letters)
    att = read_parquet(attributions)
    check_interpretable(neu, top_n=params.decode.top_n)
    dist = layer_distribution(att, neu)
    metrics = neuron_metrics(att, neu, seed=params.seed)
    info = {
        "wordlist": wordlist_info(f.wordlist),
        "rule": f">= {f.min_words} of the top {f.top_n} decoded tokens are dictionary words of "
                f">= {f.min_letters} letters",
        "attribute_rank_by": params.attribute.rank_by,
        "decode_lens": params.decode.lens,
        "kept_fraction": "per image: interpretable / distinct top units; mean over images with a 95% "
                         "percentile bootstrap CI over images (n = images)",
        "layer_distribution": "counts of (image, layer, unit): each image's distinct top units",
    }
    write_parquet(neu, out)
    with atomic_file(layers_out) as tmp:
        dist.write_csv(tmp)
    write_json(metrics, metrics_out)
    write_json(info, info_out)
    kf = metrics["kept_fraction"]
    log(NAME, f"{metrics['n_interpretable']} of {metrics['n_units']} distinct units interpretable; kept "
              f"fraction per image {kf['mean']} (95% CI {kf['lo']}..{kf['hi']}, n={kf['n']}); "
              f"wrote {out}, {layers_out}, {metrics_out}, {info_out}")


if __name__ == "__main__":
    main()
