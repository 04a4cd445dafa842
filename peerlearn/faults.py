"""Crash specs: which processes stop, and when.

Grammar (cluster ids and indexes are 0-based; processes are ``cluster.index``)::

    cluster:C@t=K                 every process of cluster C stops when it reaches iteration K
    process:C.I@t=K               process C.I stops when it reaches iteration K
    process:C.I@t=K:mid-broadcast C.I stops during its first broadcast of iteration K: a random
                                  part of the recipients gets the message, the rest never does
    process:C.I@t=K:restart       C.I restarts when it reaches iteration K: it loses its program,
                                  its buffered messages and those in flight to it, and rejoins at
                                  once from the live process furthest ahead (a centered
                                  algorithm's: through its center; a process only; the
                                  algorithm's record needs a resume entry point)
    …@time=X                      at virtual time X instead of an iteration (simulator only)

"Reaches iteration K" means it completed K − 1 iterations; ``t=1`` crashes it before it sends
anything. A crash is crash-stop: a crashed process never recovers (Attiya–Schiller §2.1). A
restart is the recovery the paper leaves out (its L550): the simulator's model of a daemon
killed and started again, which takes a live peer's state (docs/algorithms.md, rejoin). For the
default quorum a restarted process counts among the f failures: it misses the iterations it
skips, as a crashed process would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from peerlearn.errors import CrashSpecError
from peerlearn.membership import Membership

__all__ = ["CrashMode", "CrashSpec", "parse_crash"]

_SPEC = re.compile(
    r"""^(?P<what>cluster|process):(?P<who>\d+(?:\.\d+)?)
        @(?P<when>t|time)=(?P<at>[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)
        (?::(?P<mode>mid-broadcast|restart))?$""",
    re.VERBOSE,
)


#: how a spec stops its processes: for good (``clean``, ``mid-broadcast``) or to rejoin
#: (``restart``)
CrashMode = Literal["clean", "mid-broadcast", "restart"]


@dataclass(frozen=True)
class CrashSpec:
    spec: str
    pids: tuple[int, ...]
    at_step: int | None
    at_time: float | None
    mode: CrashMode


def parse_crash(spec: str, membership: Membership) -> CrashSpec:
    """Parse one ``--crash`` spec against the membership; CrashSpecError says what is wrong."""
    m = _SPEC.match(spec.strip())
    if m is None:
        raise CrashSpecError(
            f"malformed crash spec {spec!r}: expected cluster:C@t=K, process:C.I@t=K, "
            "…@time=X, optionally followed by :mid-broadcast or :restart"
        )
    what, who = m["what"], m["who"]
    if what == "cluster" and m["mode"] == "restart":
        # A restart is one process rejoining from the live ones; a whole cluster restarting is
        # a daemon restart, which the daemon tests cover with real processes.
        raise CrashSpecError(
            f"crash spec {spec!r}: restart applies to one process (process:C.I@t=K:restart), "
            "not to a cluster"
        )
    try:
        if what == "cluster":
            if "." in who:
                raise CrashSpecError(f"crash spec {spec!r}: a cluster is one number, got {who}")
            cluster = int(who)
            membership.pid(cluster, 0)  # validates the cluster id
            pids = membership.members[cluster]
        else:
            if "." not in who:
                raise CrashSpecError(f"crash spec {spec!r}: a process is cluster.index, got {who}")
            c, i = (int(part) for part in who.split("."))
            pids = (membership.pid(c, i),)
    except CrashSpecError:
        raise
    except Exception as exc:  # ConfigError from membership: re-label it as a crash-spec error
        raise CrashSpecError(f"crash spec {spec!r}: {exc}") from exc
    at_step: int | None = None
    at_time: float | None = None
    if m["when"] == "t":
        if not m["at"].isdigit() or int(m["at"]) < 1:
            raise CrashSpecError(f"crash spec {spec!r}: t must be an iteration ≥ 1")
        at_step = int(m["at"])
    else:
        at_time = float(m["at"])
    mode: CrashMode = (
        "restart" if m["mode"] == "restart" else "mid-broadcast" if m["mode"] else "clean"
    )
    if mode == "mid-broadcast" and at_step is None:
        raise CrashSpecError(f"crash spec {spec!r}: mid-broadcast needs t=K, not time=X")
    return CrashSpec(spec=spec, pids=tuple(pids), at_step=at_step, at_time=at_time, mode=mode)
