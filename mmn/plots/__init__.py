"""Figures of the paper (matplotlib, Agg) and the plot-ready tables behind ``dvc plots``.

* :mod:`mmn.plots.heatmap` — activation maps over images (pure numpy/PIL overlays).
* :mod:`mmn.plots.tables` — plot-ready tables from the stage outputs (polars, pure).
* :mod:`mmn.plots.activations` — per-unit activation maps of selected units (needs the models).
* :mod:`mmn.plots.figures` — one function per figure, each returning a matplotlib Figure.
* :mod:`mmn.plots.build` — the ``plot`` stage's work: selection, figures, tables, report.
"""
