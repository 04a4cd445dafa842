"""The algorithm records, one module per paper (see :mod:`peerlearn.algorithms.spec`)."""
