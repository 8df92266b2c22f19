"""CPU time per process during a window, from ``/proc`` (issue 18, item 3): what each
part of a cluster pays per fire.

:class:`CpuMeter` reads ``utime + stime`` (``/proc/PID/stat``, fields 14-15) of every
process whose command line it recognises, at the start and at the end of a window, and adds
``cutime + cstime`` (fields 16-17: children that ended and were reaped) so that a worker's
slot processes that were replaced inside the window are still counted with their worker.
Labels: the node id of ``qcluster start --node-id ID`` (``s1``, ``w1``...), ``slots`` (every
``qcluster.worker.child``), ``postgres`` (every PostgreSQL backend, the postmaster and its
helpers), ``aps`` (the bare APScheduler child of the bench). A process that starts inside
the window counts from zero; one that ends inside it is missed (its parent's ``cutime``
keeps it only for slot processes, which the worker reaps).

``python -m bench.cpu --seconds 10`` prints the same for whatever runs on the machine, so
an older commit's cluster can be measured from outside.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def label_of(cmdline: list[str]) -> str | None:
    """The label of a process from its argv (None: not ours)."""
    if not cmdline:
        return None
    if "qcluster.worker.child" in cmdline:
        return "slots"
    if cmdline[0].startswith("postgres") or cmdline[0].endswith("/postgres"):
        return "postgres"
    if "start" in cmdline and any(a.endswith("qcluster") or a == "qcluster" for a in cmdline):
        if "--node-id" in cmdline:
            i = cmdline.index("--node-id")
            if i + 1 < len(cmdline):
                return cmdline[i + 1]
        return "node"
    if "bench.aps" in " ".join(cmdline):
        return "aps"
    return None


def _read(pid: str) -> tuple[str, float] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    label = label_of([a.decode(errors="replace") for a in raw.split(b"\0") if a])
    if label is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    # fields[0] is field 3 (state): utime, stime, cutime, cstime are fields 14-17.
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    children = cutime + cstime if label != "postgres" else 0  # the postmaster reaps ours
    return label, (utime + stime + children) / TICK


def snapshot() -> dict[int, tuple[str, float]]:
    """{pid: (label, CPU seconds so far)} of every recognised process."""
    out: dict[int, tuple[str, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            got = _read(entry)
            if got is not None:
                out[int(entry)] = got
    return out


def diff(before: dict[int, tuple[str, float]],
         after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds per label between two snapshots."""
    spent: dict[str, float] = defaultdict(float)
    for pid, (label, cpu) in after.items():
        was = before.get(pid)
        start = was[1] if was is not None and was[0] == label else 0.0
        spent[label] += max(0.0, cpu - start)
    return dict(spent)


class CpuMeter:
    """CPU seconds per label over a window: :meth:`start`, then :meth:`stop`."""

    def __init__(self) -> None:
        self._before: dict[int, tuple[str, float]] = {}
        self._t0 = 0.0
        self.wall = 0.0
        self.spent: dict[str, float] = {}

    def start(self) -> None:
        self._before, self._t0 = snapshot(), time.monotonic()

    def stop(self) -> dict[str, float]:
        self.spent = diff(self._before, snapshot())
        self.wall = time.monotonic() - self._t0
        return self.spent

    def per_fire_us(self, fires: int, roles: dict[str, str] | None = None) -> dict[str, float]:
        """µs of CPU per fire per label (``roles`` renames labels, e.g. ``s1`` to
        ``leader``; labels renamed alike are summed)."""
        if fires <= 0:
            return {}
        out: dict[str, float] = defaultdict(float)
        for label, cpu in self.spent.items():
            out[(roles or {}).get(label, label)] += cpu / fires * 1e6
        return {k: round(v, 1) for k, v in sorted(out.items())}

    def shares(self) -> dict[str, float]:
        """Percent of one core per label over the window."""
        if self.wall <= 0:
            return {}
        return {k: round(v / self.wall * 100, 1) for k, v in sorted(self.spent.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fires", type=int, default=0, help="fires in the window, for µs/fire")
    a = p.parse_args()
    meter = CpuMeter()
    meter.start()
    time.sleep(a.seconds)
    meter.stop()
    for label, share in meter.shares().items():
        per = f"  {meter.spent[label] / a.fires * 1e6:8.1f} µs/fire" if a.fires else ""
        print(f"{label:10s} {share:6.1f}% of a core{per}")


if __name__ == "__main__":
    main()
