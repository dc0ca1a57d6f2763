"""npo-sim: theory and simulation for LLM unlearning with Negative Preference Optimization.

The light root of the project (torch, numpy, scipy): every loss (:mod:`npo_sim.losses`), the paper's
closed forms (:mod:`npo_sim.theory`), model-agnostic metrics (:mod:`npo_sim.metrics`) and the
synthetic settings. ``full_scale`` builds on it; it never imports ``full_scale``.
"""

__version__ = "0.1.0"
