"""Evaluation statistics and reporting: accuracies, Wilson intervals, majority votes, verifier
confusion, paired McNemar / bootstrap tests with Holm adjustment (``stats``, NumPy only), and the
Markdown + PNG run report (``report``).

Layer 4: may import ``roles``, ``config`` and ``runtime``.
"""
