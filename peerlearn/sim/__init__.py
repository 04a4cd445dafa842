"""The deterministic simulator: many processes, one Python process, virtual time."""

from peerlearn.sim.core import BlockedProcess, Outcome, Restart, Simulator, Status
from peerlearn.sim.runner import ProcessResult, SimResult, consensus_distance, run_simulation

__all__ = [
    "BlockedProcess",
    "Outcome",
    "ProcessResult",
    "Restart",
    "SimResult",
    "Simulator",
    "Status",
    "consensus_distance",
    "run_simulation",
]
