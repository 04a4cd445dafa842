"""peerlearn: asynchronous, fully decentralized SGD across machines.

The algorithms of Attiya–Schiller (cluster-based asynchronous SGD) and related papers are written
once as sans-IO generator programs (:mod:`peerlearn.algorithms`) that yield effects
(:mod:`peerlearn.effects`); runtimes interpret them — today the deterministic simulator
(:mod:`peerlearn.sim`).
"""

__version__ = "0.1.0"
