"""Figure functions over result tables (CSV/JSON), never over live training state.

One module per setting (``theory``, ``synthetic``, ``markov``, ...). This package sets a headless
backend and a common style.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

#: one colour per method, shared by every figure so GA and NPO look the same everywhere
METHOD_COLORS = {
    "ga": "#d62728", "ga_rt": "#ff7f0e", "ga_kl": "#e377c2", "idk_rt": "#7f7f7f",
    "dpo": "#8c564b", "dpo_rt": "#bcbd22", "dpo_kl": "#9467bd",
    "npo": "#1f77b4", "npo_rt": "#2ca02c", "npo_kl": "#17becf",
    "simnpo": "#393b79", "simnpo_rt": "#637939", "kto": "#843c39",
}

METHOD_LABELS = {
    "ga": "GA", "ga_rt": "GA+RT", "ga_kl": "GA+KL", "idk_rt": "IDK+RT", "dpo": "DPO", "dpo_rt": "DPO+RT",
    "dpo_kl": "DPO+KL", "npo": "NPO", "npo_rt": "NPO+RT", "npo_kl": "NPO+KL", "simnpo": "SimNPO",
    "simnpo_rt": "SimNPO+RT", "kto": "KTO",
}


def color(method: str) -> str:
    return METHOD_COLORS.get(method, "#333333")


def label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 4.2, height: float = 3.3):
    plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
