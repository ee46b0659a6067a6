"""Evaluation of instruction-based image editing: metrics, named protocols, VIEScore judges.

Entry points: :func:`insightedit.evaluation.runner.evaluate` (used by ``insightedit evaluate`` and
``insightedit test``) and :mod:`insightedit.evaluation.protocols` (what each protocol compares).
See ``docs/evaluation.md``.
"""
