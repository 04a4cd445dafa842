"""Analysis: the papers' closed forms and mixing times, computed from their formulas.

No runtime code: nothing here runs an algorithm or is needed to run one. It computes the numbers
that the tests, the config's theory warnings and the ``peerlearn mixing`` command compare runs
against:

* :mod:`peerlearn.analysis.mixing` — MixML's mixing time t_mix of each communication protocol
  (Assumptions 1–3 and Lemma 1 of Lu, Nash & De Sa, Section 3.1), exact or sampled.
* :mod:`peerlearn.analysis.mixing_command` — the ``peerlearn mixing`` command around it.
* :mod:`peerlearn.analysis.easgd_theory` — synchronous EASGD's moments, stability condition and
  limits on a 1-D quadratic (EASGD supplement, Section 7).

Dependencies run one way: analysis reads the algorithm records (the default period m) and the
run config's defaults (the slack γ), and the records read ``easgd_theory`` for their stability
warning; no runtime module imports ``mixing``. The submodules are not imported here, so
importing one does not pull in the others' dependencies.
"""
