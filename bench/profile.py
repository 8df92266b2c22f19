"""``--profile``: py-spy on the leader and on one worker during qcluster's steady window
and its burst.

py-spy samples the processes from outside (``--nonblocking``: it never pauses them, at the
price of an occasional torn stack) at 100 Hz, only threads that are running Python code
(idle waits are left out), so the counts are CPU time. It writes collapsed stacks, one
``thread;frame;frame count`` line each (``profile-<scenario>-<label>.txt``), and from them this
module writes:

* ``profile-<scenario>-<label>.svg``: a flame graph (icicle: callers on top), a tooltip per frame;
* ``profile-<scenario>-<label>-top.txt``: the share of samples per thread, and the functions with
  the most samples of their own ("self") and in total (themselves and their callees).

py-spy needs ``pip install py-spy``, and the right to trace the processes (root, or
``kernel.yama.ptrace_scope=0``, or CAP_SYS_PTRACE in a container).
"""

from __future__ import annotations

import collections
import html
import re
import shutil
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?):\d+\)$")
RATE = 100


class Profiler:
    """Starts py-spy on processes and turns its output into SVGs and top lists."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.py_spy = shutil.which("py-spy")
        self._runs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    @property
    def available(self) -> bool:
        return self.py_spy is not None

    def start(self, label: str, pid: int | None, seconds: float) -> None:
        if self.py_spy is None or pid is None:
            return
        raw = self.out / f"profile-{label}.txt"
        command = [self.py_spy, "record", "--pid", str(pid), "--duration",
                   str(max(1, round(seconds))), "--rate", str(RATE), "--nonblocking",
                   "--threads", "--format", "raw", "--output", str(raw)]
        with open(self.out / f"profile-{label}.log", "wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=log)
        self._runs.append((label, proc, raw))

    def finish(self, timeout: float = 60) -> list[Path]:
        """Wait for every py-spy, render what they wrote; return the files made."""
        made: list[Path] = []
        for label, proc, raw in self._runs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
            if not raw.exists():
                continue
            stacks = read_collapsed(raw)
            svg = self.out / f"profile-{label}.svg"
            svg.write_text(flame_svg(stacks, f"{label}: CPU samples at {RATE} Hz"))
            top = self.out / f"profile-{label}-top.txt"
            top.write_text(top_text(stacks))
            made += [raw, svg, top]
        self._runs.clear()
        return made

    def hook(self, targets: dict[str, Callable[[], int | None]]) -> Callable[[str, float], None]:
        """A callback for a scenario: ``hook(scenario, seconds)`` profiles each target."""
        def start(scenario: str, seconds: float) -> None:
            for label, pid in targets.items():
                self.start(f"{scenario}-{label}", pid(), seconds)
        return start


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _function(frame: str) -> str:
    m = _FRAME.match(frame)
    if m is None:
        return frame
    return f"{m['func']} ({m['file'].rsplit('site-packages/', 1)[-1]})"


def _thread(frame: str) -> str:
    # "thread (0x7f..): qc-dispatch" -> "qc-dispatch"; pool threads lose their number
    name = frame.split(": ", 1)[-1]
    return re.sub(r"_\d+$", "_N", name)


def top_text(stacks: list[tuple[list[str], int]], limit: int = 40) -> str:
    total = sum(n for _, n in stacks) or 1
    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        threads[_thread(frames[0])] += n
        funcs = [_function(f) for f in frames[1:]]
        if funcs:
            own[funcs[-1]] += n
        for f in set(funcs):
            incl[f] += n
    lines = [f"{total} samples ({total / RATE:.1f} CPU-seconds at {RATE} Hz)", "",
             "by thread:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in threads.most_common()]
    lines += ["", "self (the function itself was running):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(limit)]
    lines += ["", "total (the function or its callees):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in incl.most_common(limit)]
    return "\n".join(lines) + "\n"


class _Node:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[str, _Node] = {}


def flame_svg(stacks: list[tuple[list[str], int]], title: str, width: int = 1400) -> str:
    root = _Node()
    for frames, n in stacks:
        node = root
        node.count += n
        for frame in frames:
            node = node.children.setdefault(frame, _Node())
            node.count += n
    row, top = 17, 30
    rects: list[str] = []
    depth_max = 0

    def draw(node: _Node, x: float, depth: int) -> None:
        nonlocal depth_max
        for name, child in sorted(node.children.items()):
            w = child.count / max(root.count, 1) * width
            if w >= 0.5:
                depth_max = max(depth_max, depth)
                hue = zlib.crc32(_function(name).encode()) % 60
                label = html.escape(name)
                text = html.escape(name[: max(0, int(w / 7))])
                pct = 100 * child.count / max(root.count, 1)
                rects.append(
                    f'<g><title>{label} ({child.count} samples, {pct:.1f}%)</title>'
                    f'<rect x="{x:.1f}" y="{top + depth * row}" width="{w:.1f}" '
                    f'height="{row - 1}" fill="hsl({hue},80%,60%)"/>'
                    f'<text x="{x + 2:.1f}" y="{top + depth * row + 12}">{text}</text></g>')
                draw(child, x, depth + 1)
            x += w

    draw(root, 0.0, 0)
    height = top + (depth_max + 1) * row + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="monospace" font-size="11">'
            f'<text x="4" y="18" font-size="14">{html.escape(title)}; {root.count} samples'
            f'</text>{"".join(rects)}</svg>\n')
