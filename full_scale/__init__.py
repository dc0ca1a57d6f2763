"""full_scale: the npo_sim losses on Hugging Face causal LMs over TOFU (the ``npo-tofu`` command).

Imports :mod:`npo_sim` (losses, metrics, claims, run I/O); never the reverse. Needs the ``full`` extra.

* ``config``: the frozen records of a job (run config, finetune/unlearn spec, eval spec);
* ``data``, ``models``, ``logprobs``: TOFU data and prompts, HF models and tiny-llama, log-likelihoods;
* ``tasks``, ``train``, ``checkpoint``: what a micro-batch computes, the one training loop, resume;
* ``generate``, ``evaluate``, ``aggregate``: the greedy decoder, TOFU evaluation, TOFU's metrics;
* ``report``, ``study``: tables, figures and claims from run directories; the study orchestrator;
* ``cli``: all argument parsing.
"""
