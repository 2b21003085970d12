"""Differential privacy: the accountants (``accounting``: record-level ledgers, the plan of σ),
client-level DP on the server (``client_level``: clipping, noise, adaptive clipping) and the
randomness of every DP draw (``randomness``: a node's secret and its streams).

Layer 1: may import ``fedlora.core`` only.
"""
