"""Figure functions over result tables (CSV/JSON), never over live training state.

One module per setting (``theory``, ``synthetic``, ``markov``, ...). This package sets a headless
backend and a common style.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from ..losses import color, label  # noqa: E402,F401  (labels and colours are registry facts)


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 4.2, height: float = 3.3):
    plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
