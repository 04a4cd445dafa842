"""``python -m peerlearn.cli``: the ``peerlearn`` command without its console script."""

from peerlearn.cli import main

main()
