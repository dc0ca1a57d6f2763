"""full_scale: the npo_sim losses on Hugging Face causal LMs over TOFU.

Imports :mod:`npo_sim` (losses, metrics); never the reverse. Needs the ``full`` extra.
"""
