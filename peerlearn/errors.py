"""The peerlearn error tree.

Every error peerlearn raises on purpose derives from :class:`PeerlearnError`::

    PeerlearnError
    ├── ConfigError           a run description that cannot be run (bad value, N > n − f, …);
    │   └── CrashSpecError    a malformed ``--crash`` spec
    ├── ProblemError          a problem that cannot be built or evaluated
    ├── ProgramError          an algorithm program yielded something its runtime cannot interpret
    ├── StartupError          a daemon cannot start: its peer or API address is in use, …
    └── SimulationError       the simulator met an inconsistent state (a bug, not bad input)

The CLI turns every ``PeerlearnError`` into one clear line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CrashSpecError",
    "PeerlearnError",
    "ProblemError",
    "ProgramError",
    "SimulationError",
    "StartupError",
]


class PeerlearnError(Exception):
    """Base of every error peerlearn raises deliberately."""


class ConfigError(PeerlearnError, ValueError):
    """The run description is invalid; the message names the field and the reason."""


class CrashSpecError(ConfigError):
    """A ``--crash`` spec does not parse or names a process or cluster that does not exist."""


class ProblemError(PeerlearnError):
    """A problem could not be built (unknown name, bad parameter, data unavailable)."""


class ProgramError(PeerlearnError):
    """An algorithm program broke the effect contract (unknown effect, bad quorum, …)."""


class SimulationError(PeerlearnError):
    """The simulator reached a state that its invariants rule out."""


class StartupError(PeerlearnError):
    """A daemon could not start; the message names the address or resource and why."""
