"""The synthetic settings, each a :class:`npo_sim.study.Study`: ``core`` (loss-level claims),
``logistic`` (the Theorem-2 lab), ``mixture`` (the paper's §4 experiment) and ``markov`` (Markov
chains, tabular and transformer). Each module exposes ``STUDY`` and ``report_configs(smoke)``, the
configs ``npo-sim figures`` runs."""
