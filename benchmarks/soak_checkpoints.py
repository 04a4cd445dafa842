"""Soak test of checkpointing daemons under faults (issue 14): RSS and open fds stay flat.

What it measures: four real ``peerlearn run`` daemons (Alg 1, two workers each, quadratic
problem of dimension 1000, ``--state-dir`` with a checkpoint every 5 s) run on 127.0.0.1 for
``--minutes`` (default 30) while a fault hits one daemon every ``--period`` seconds (default
120), in turn:

1. ``kill``: SIGKILL, then a restart with the same command line (it resumes from its
   ``--state-dir`` checkpoint);
2. ``stop``: SIGSTOP for ``--hold`` seconds, then SIGCONT;
3. ``partition``: nftables drops every packet between the daemon and its peers (peer ports
   only, never the control API) for ``--hold`` seconds; skipped, and said so, without ``nft``.

The victim moves round the four daemons. On the shared loopback a port alone cannot tell a
daemon's outgoing connections from its peers' (each daemon dials every peer from an ephemeral
port), so each daemon runs with its own group id (uid still root) and the partition's rules
match the victim's sockets by ``meta skgid``, mark those connections in conntrack and drop both
directions, beside everything to and from the victim's peer port. The quorum is N = 6 of the
n = 8 workers (``--max-failures 2``): any three daemons go on while the fourth is down.

Every ``--sample`` seconds each daemon process's RSS (``VmRSS``) and open fd count (from
``/proc``) and its workers' steps (``GET /status``) go to ``--csv``. At the end:

* flat: for every daemon process that lived at least 10 minutes, the median of the last third
  of its samples is within ±5 % of the median of its samples in its minutes 3–6 (after
  warm-up), for RSS and for fds. A restarted daemon is a new process and is judged on its own.
* progress: the lowest step of all eight workers grows over every fault period (read just
  before each fault and at the end, when every daemon should be back).
* resume: every restarted daemon logged "resuming from the checkpoint" (and not "not resuming
  from the checkpoint").
* no daemon exited unless this script killed it.

With ``--minutes`` other than 30, the 10-minute lifetime and the 3–6 minute window scale with
it (``--minutes 3``: 1 minute and 18–36 s), as do the default ``--sample`` interval (at least
2 s) and ``--hold`` (at most a third of the period).

Run (as root, for nft) from the repository root::

    .venv/bin/python benchmarks/soak_checkpoints.py --minutes 30

``--minutes 3 --period 30`` checks that the script works (every fault kind, the table); its
windows are too short to judge memory. A run takes the full duration plus about half a minute
of start and shut-down, and is never run in CI. Exit code 1 if a check failed. The daemons log
at ``info``: the resume line a check looks for is an info line.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository: benchmarks._common

from benchmarks._common import free_ports  # noqa: E402

PEERLEARN = Path(sys.executable).with_name("peerlearn")
HOST = "127.0.0.1"
DAEMONS = 4
WORKERS = 2
FAULTS = ("kill", "stop", "partition")
#: each daemon runs with its own group id so that nft can tell its sockets from its peers' on
#: the shared loopback (``meta skgid``); the uid stays root, so file access is unchanged
GID_BASE = 61000
RESUMED = re.compile(r"(?<!not )resuming from the checkpoint")
NOT_RESUMED = "not resuming from the checkpoint"


@dataclass
class Sample:
    t: float
    rss_kb: int
    fds: int


@dataclass
class Proc:
    """One daemon process (a slot gets a new one at every restart)."""

    popen: subprocess.Popen[bytes]
    log: Path
    started: float  # seconds since the soak started
    restarted: bool
    ended: float | None = None
    cluster: int | None = None  # its cluster id (by address order), which its logs name it by
    killed_by_us: bool = False
    samples: list[Sample] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Slot:
    index: int
    listen: int
    api: int
    cmd: list[str]
    procs: list[Proc] = field(default_factory=list)

    @property
    def proc(self) -> Proc:
        return self.procs[-1]


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.t0 = time.monotonic()
        self.http = httpx.Client(timeout=1.0)
        self.table = f"peerlearn_soak_{os.getpid()}"
        self.table_up = False
        self.partitions_ok, self.no_partitions_why = self._nft_usable()
        self.faults: dict[str, int] = dict.fromkeys(FAULTS, 0)
        self.fault_log: list[str] = []
        self.failures: list[str] = []
        self.boundaries: list[tuple[float, int | None]] = []  # (time, min step of all workers)
        self.current_fault = ""
        ports = free_ports(2 * DAEMONS)
        listens, apis = ports[:DAEMONS], ports[DAEMONS:]
        peers = ",".join(f"{HOST}:{p}" for p in listens)
        self.slots = [
            Slot(i, listens[i], apis[i], self._command(i, listens[i], apis[i], peers))
            for i in range(DAEMONS)
        ]
        (workdir / "logs").mkdir(parents=True, exist_ok=True)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _command(self, i: int, listen: int, api: int, peers: str) -> list[str]:
        return [
            str(PEERLEARN),
            "run",
            *("--listen", f"{HOST}:{listen}"),
            *("--api", f"{HOST}:{api}"),
            *("--peers", peers),
            *("--workers", str(WORKERS)),
            *("--algorithm", "alg1"),
            *("--steps", str(10**9)),  # never finishes within the soak
            *("--max-failures", "2"),  # N = n − f = 6 of 8: three daemons suffice
            *("--state-dir", str(self.workdir / f"d{i}")),
            *("--checkpoint-every", "5"),
            *("--out", str(self.workdir / f"o{i}")),
            *("--set", "problem.name=quadratic"),
            *("--set", "problem.dim=1000"),
            # info, not warning: "resuming from the checkpoint of …" is an info line
            *("--log-level", "info"),
        ]

    # -- processes ---------------------------------------------------------------------------

    def start(self, slot: Slot, restarted: bool) -> Proc:
        log = self.workdir / "logs" / f"d{slot.index}.{len(slot.procs)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                slot.cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # its own session: a Ctrl-C on the soak reaches the soak only, which then
                # stops the daemons in order
                start_new_session=True,
                group=GID_BASE + slot.index if self.partitions_ok else None,
            )
        proc = Proc(popen, log, self.now(), restarted)
        slot.procs.append(proc)
        return proc

    def status(self, slot: Slot) -> dict[str, Any] | None:
        try:
            answer = self.http.get(f"http://{HOST}:{slot.api}/status")
            answer.raise_for_status()
            result: dict[str, Any] = answer.json()
            return result
        except (httpx.HTTPError, ValueError):
            return None

    def wait_up(self, slot: Slot, timeout: float = 60.0) -> None:
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if slot.proc.popen.poll() is not None:
                raise RuntimeError(
                    f"daemon {slot.index} exited at start (code {slot.proc.popen.returncode}); "
                    f"its log:\n{tail(slot.proc.log)}"
                )
            if self.status(slot) is not None:
                return
            time.sleep(0.2)
        raise RuntimeError(f"daemon {slot.index} did not answer /status in {timeout:g} s")

    def check_alive(self) -> None:
        for slot in self.slots:
            proc = slot.proc
            if proc.ended is None and proc.popen.poll() is not None:
                proc.ended = self.now()
                self.failures.append(
                    f"daemon {slot.index} (pid {proc.pid}) exited by itself at "
                    f"{proc.ended:.0f} s, code {proc.popen.returncode}; log tail:\n"
                    f"{tail(proc.log)}"
                )
                # it is restarted so that the soak goes on measuring the others
                self.start(slot, restarted=True)

    # -- sampling ----------------------------------------------------------------------------

    def sample(self, writer: Any) -> None:
        t = self.now()
        for slot in self.slots:
            proc = slot.proc
            rss, fds = proc_usage(proc.pid)
            if rss is None or fds is None:
                continue
            proc.samples.append(Sample(t, rss, fds))
            st = self.status(slot)
            if st is not None and proc.cluster is None:
                proc.cluster = st["cluster"]
            steps = [w["step"] for w in st["workers"]] if st else []
            away = sum(1 for p in st.get("peers", []) if p.get("away")) if st else ""
            writer.writerow(
                [
                    f"{t:.1f}",
                    slot.index,
                    proc.pid,
                    rss,
                    fds,
                    min(steps) if steps else "",
                    max(steps) if steps else "",
                    st["state"] if st else "",
                    away,
                    self.current_fault,
                ]
            )

    def min_step(self) -> int | None:
        """The lowest step of all eight workers; None if a daemon does not answer."""
        steps: list[int] = []
        for slot in self.slots:
            st = self.status(slot)
            if st is None:
                return None
            steps += [w["step"] for w in st["workers"]]
        return min(steps)

    # -- faults ------------------------------------------------------------------------------

    def fault(self, k: int) -> None:
        kind = FAULTS[k % len(FAULTS)]
        if kind == "partition" and not self.partitions_ok:
            self.fault_log.append(f"{self.now():6.0f} s  partition skipped")
            return
        slot = self.slots[k % DAEMONS]
        self.faults[kind] += 1
        self.current_fault = f"{kind} d{slot.index}"
        self.fault_log.append(
            f"{self.now():6.0f} s  {kind} d{slot.index} "
            f"(pid {slot.proc.pid}, cluster {slot.proc.cluster})"
        )
        if kind == "kill":
            proc = slot.proc
            proc.killed_by_us = True
            proc.popen.kill()
            proc.popen.wait()
            proc.ended = self.now()
            self.start(slot, restarted=True)
        elif kind == "stop":
            os.kill(slot.proc.pid, signal.SIGSTOP)
        else:
            self.partition(slot)

    def heal(self, k: int) -> None:
        kind = FAULTS[k % len(FAULTS)]
        slot = self.slots[k % DAEMONS]
        if kind == "stop":
            os.kill(slot.proc.pid, signal.SIGCONT)
        elif kind == "partition" and self.partitions_ok:
            self.drop_table()
        self.current_fault = ""

    def _nft_usable(self) -> tuple[bool, str]:
        if shutil.which("nft") is None:
            return False, "nft not found"
        if os.geteuid() != 0:
            return False, "not root (nft and per-daemon group ids need it)"
        probe = nft(f"add table inet {self.table}\ndelete table inet {self.table}\n")
        if probe.returncode != 0:
            return False, f"nft refused a table: {probe.stderr.strip()}"
        return True, ""

    def partition(self, slot: Slot) -> None:
        others = ", ".join(str(s.listen) for s in self.slots if s is not slot)
        # A fresh conntrack mark per partition: a connection the victim sent on is marked, so
        # that its peers' replies on it are dropped too; marks left on old connections then
        # match no later rule.
        mark = 0x5E000000 | (os.getpid() & 0xFFF) << 12 | self.faults["partition"] & 0xFFF
        table = f"inet {self.table}"
        rules = (
            f"add table {table}\n"
            f"add chain {table} out {{ type filter hook output priority 0; policy accept; }}\n"
            # what the victim sends to its peers' ports (its own links, and its dials)
            f"add rule {table} out ip daddr {HOST} meta skgid {GID_BASE + slot.index} "
            f"tcp dport {{ {others} }} ct mark set {mark:#x}\n"
            f"add rule {table} out ip daddr {HOST} ct mark {mark:#x} drop\n"
            # the peers' links to the victim, both ways
            f"add rule {table} out ip daddr {HOST} tcp dport {slot.listen} drop\n"
            f"add rule {table} out ip daddr {HOST} tcp sport {slot.listen} drop\n"
        )
        result = nft(rules)
        if result.returncode != 0:
            self.failures.append(f"nft partition of daemon {slot.index}: {result.stderr}")
            return
        self.table_up = True

    def drop_table(self) -> None:
        if self.table_up:
            result = nft(f"delete table inet {self.table}\n")
            if result.returncode != 0:
                self.failures.append(f"nft delete table: {result.stderr}")
            self.table_up = False

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> None:
        minutes, period, hold = self.args.minutes, self.args.period, self.args.hold
        duration = minutes * 60.0
        for slot in self.slots:
            self.start(slot, restarted=False)
        for slot in self.slots:
            self.wait_up(slot)
        print(f"4 daemons up in {self.now():.1f} s; soak of {minutes:g} min", flush=True)
        if not self.partitions_ok:
            print(f"partitions skipped: {self.no_partitions_why}", flush=True)
        with open(self.args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(
                [
                    "t_s",
                    "slot",
                    "pid",
                    "rss_kb",
                    "fds",
                    "min_step",
                    "max_step",
                    "state",
                    "peers_away",
                    "fault",
                ]
            )
            next_sample = 0.0
            next_fault = period
            heal_at: tuple[float, int] | None = None
            k = 0
            while (t := self.now()) < duration:
                if heal_at is not None and t >= heal_at[0]:
                    self.heal(heal_at[1])
                    heal_at = None
                if t >= next_fault:
                    # the lowest step just before the fault: the previous period's progress
                    self.boundaries.append((t, self.min_step()))
                    self.fault(k)
                    print(self.fault_log[-1], flush=True)
                    heal_at = (t + hold, k)
                    k += 1
                    next_fault += period
                if t >= next_sample:
                    self.check_alive()
                    self.sample(writer)
                    f.flush()
                    next_sample += self.args.sample
                wake = min(next_sample, next_fault, duration, *(heal_at[:1] if heal_at else ()))
                time.sleep(max(0.0, wake - self.now()))
            if heal_at is not None:
                self.heal(heal_at[1])
            self.boundaries.append((self.now(), self.min_step()))

    def stop_all(self) -> None:
        self.drop_table()
        live = [s.proc for s in self.slots if s.procs and s.proc.popen.poll() is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a stopped daemon cannot act on SIGTERM
                proc.popen.terminate()
        deadline = time.monotonic() + 15
        for proc in live:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
            if proc.ended is None:
                proc.ended = self.now()
                proc.killed_by_us = True
        self.http.close()

    # -- verdicts ----------------------------------------------------------------------------

    def report(self) -> bool:
        scale = self.args.minutes / 30.0
        min_life = 600.0 * scale
        warm = (180.0 * scale, 360.0 * scale)
        rows = []
        for slot in self.slots:
            for proc in slot.procs:
                rows.append(self.judge(slot, proc, min_life, warm))
        header = (
            "slot",
            "cluster",
            "pid",
            "lived s",
            "RSS start MB",
            "RSS end MB",
            "fds start",
            "fds end",
            "verdict",
        )
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
        print()
        print(
            f"Soak: {self.args.minutes:g} min, a fault every {self.args.period:g} s "
            f"(held {self.args.hold:g} s), samples every {self.args.sample:g} s; "
            f"flat = end vs warm-up medians within ±{self.args.tolerance:g} %, for processes "
            f"that lived ≥ {min_life:.0f} s (warm-up window {warm[0]:.0f}–{warm[1]:.0f} s "
            "of each one's life)"
        )
        for r in [header, *rows]:
            print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
        print()
        skipped = "" if self.partitions_ok else f" (partitions skipped: {self.no_partitions_why})"
        print("faults: " + ", ".join(f"{k} {v}" for k, v in self.faults.items()) + skipped)
        for line in self.fault_log:
            print("  " + line)
        print("min step of all 8 workers before each fault and at the end:")
        prev: int | None = 0
        for t, step in self.boundaries:
            if step is not None and prev is not None and step > prev:
                print(f"  {t:6.0f} s  {step:>10}  +{step - prev}")
            else:
                print(f"  {t:6.0f} s  {step if step is not None else 'no answer':>10}  NO PROGRESS")
                self.failures.append(f"min step did not grow in the period ending at {t:.0f} s")
            prev = step
        for slot in self.slots:
            for proc in slot.procs:
                if proc.restarted:
                    text = proc.log.read_text(errors="replace")
                    if NOT_RESUMED in text or not RESUMED.search(text):
                        lines = [ln for ln in text.splitlines() if "checkpoint" in ln][:5]
                        self.failures.append(
                            f"daemon {slot.index} pid {proc.pid} (restarted) did not log "
                            f"resuming from the checkpoint; its checkpoint lines: {lines}"
                        )
        print("command lines:")
        for slot in self.slots:
            print(f"  d{slot.index} (gid {GID_BASE + slot.index}): {shlex.join(slot.cmd)}")
        print(
            f"samples: {self.args.csv}; daemon logs: {self.workdir / 'logs'}"
            + ("" if self.args.keep else " (removed; --keep keeps them)")
        )
        for slot in self.slots:
            for proc in slot.procs:
                bad = [
                    ln
                    for ln in proc.log.read_text(errors="replace").splitlines()
                    if " ERROR " in ln or "Traceback" in ln
                ]
                if bad:
                    print(f"d{slot.index} pid {proc.pid} logged errors: {bad[:5]}")
        if self.failures:
            print("\nFAILED:")
            for why in self.failures:
                print("  - " + why)
            return False
        print("\nOK: every check passed")
        return True

    def judge(
        self, slot: Slot, proc: Proc, min_life: float, warm: tuple[float, float]
    ) -> tuple[Any, ...]:
        end = proc.ended if proc.ended is not None else self.now()
        lived = end - proc.started
        samples = proc.samples
        early = [s for s in samples if warm[0] <= s.t - proc.started <= warm[1]]
        late = samples[len(samples) - len(samples) // 3 :] if len(samples) >= 3 else []
        if lived < min_life or not early or not late:
            return (
                *(slot.index, proc.cluster, proc.pid, f"{lived:.0f}", "", "", "", ""),
                "too short, not judged",
            )
        rss0 = statistics.median(s.rss_kb for s in early)
        rss1 = statistics.median(s.rss_kb for s in late)
        fd0 = statistics.median(s.fds for s in early)
        fd1 = statistics.median(s.fds for s in late)
        tol = self.args.tolerance / 100.0
        bad = [
            f"{what} {b / a - 1:+.1%}"
            for what, a, b in (("RSS", rss0, rss1), ("fds", fd0, fd1))
            if abs(b / a - 1) > tol
        ]
        if bad:
            self.failures.append(f"daemon {slot.index} pid {proc.pid} not flat: {', '.join(bad)}")
        verdict = (
            "FAIL " + ", ".join(bad)
            if bad
            else (f"ok (RSS {rss1 / rss0 - 1:+.1%}, fds {fd1 / fd0 - 1:+.1%})")
        )
        return (
            slot.index,
            proc.cluster,
            proc.pid,
            f"{lived:.0f}",
            f"{rss0 / 1024:.1f}",
            f"{rss1 / 1024:.1f}",
            f"{fd0:g}",
            f"{fd1:g}",
            verdict,
        )


def proc_usage(pid: int) -> tuple[int | None, int | None]:
    """VmRSS in kB and the open fd count; None for a process gone (or a zombie: no VmRSS)."""
    try:
        rss = None
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        return rss, len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None, None


def nft(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM on the soak runs the same clean-up as Ctrl-C."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="soak duration (default 30)")
    p.add_argument("--period", type=float, default=120.0, help="seconds between faults")
    p.add_argument("--hold", type=float, help="seconds a stop or partition lasts (20, ≤ period/3)")
    p.add_argument("--sample", type=float, help="seconds between samples (10, scaled)")
    p.add_argument("--tolerance", type=float, default=5.0, help="flat within ± this %% (5)")
    p.add_argument("--csv", default="/tmp/soak_checkpoints.csv", help="per-sample CSV")
    p.add_argument("--keep", action="store_true", help="keep the state, out and log dirs")
    args = p.parse_args(argv)
    if args.hold is None:
        args.hold = min(20.0, args.period / 3)
    if args.sample is None:
        args.sample = max(2.0, min(10.0, 10.0 * args.minutes / 30.0))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="peerlearn-soak-"))
    soak = Soak(args, workdir)
    ok = False
    try:
        with sigterm_as_interrupt():
            soak.run()
    except KeyboardInterrupt:
        soak.failures.append(f"interrupted at {soak.now():.0f} s")
    except Exception as exc:
        soak.failures.append(f"soak error at {soak.now():.0f} s: {exc!r}")
    finally:
        soak.stop_all()
        try:
            ok = soak.report()
        finally:
            if args.keep:
                print(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
