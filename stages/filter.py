"""Stage filter: keep units whose top decoded tokens are mostly English words
(>= filter.min_words of filter.top_n, words of >= filter.min_letters letters, SCOWL list).

Every count is over units: an image's top units are its distinct (layer, unit), the
kept fraction is the share of them that are interpretable (per image, then a bootstrap
CI over images), the layer histogram counts (image, unit) pairs.

Writes data/interpretable.parquet (every decoded unit with n_words and the
interpretable flag), data/layer_distribution.csv (plot-ready: layer, n_units,
n_interpretable_units, share), summary/neurons.json (numbers only; headline:
metrics/neurons.json) and
data/info/filter.json (word list path/hash and the definitions used).
"""

from __future__ import annotations

from mmn.runner import Run, stage


@stage("filter")
def main(run: Run) -> None:
    from mmn.headline import headline
    from mmn.neurons.filter import apply_filter, filter_info, load_wordlist
    from mmn.neurons.summary import layer_distribution, neuron_metrics
    from mmn.quality import check_interpretable

    params, f = run.params, run.params.filter
    neu = apply_filter(run.read_parquet("neurons"), load_wordlist(run.path("wordlist")), min_words=f.min_words,
                       top_n=f.top_n, min_letters=f.min_letters)
    att = run.read_parquet("attributions")
    check_interpretable(neu, top_n=params.decode.top_n)
    metrics = neuron_metrics(att, neu, seed=params.seed)
    run.write_parquet("out", neu)
    run.write_csv("layers_out", layer_distribution(att, neu))
    run.write_metrics(metrics, headline)
    run.write_info(filter_info(run.path("wordlist"), f))
    kf = metrics["kept_fraction"]
    run.log(f"{metrics['n_interpretable']} of {metrics['n_units']} distinct units interpretable; kept fraction "
            f"per image {kf['mean']} (95% CI {kf['lo']}..{kf['hi']}, n={kf['n']}); wrote {run.wrote()}")


if __name__ == "__main__":
    main()
