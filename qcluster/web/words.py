"""How the dashboard says things: triggers in words, times, durations, the lateness chart."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from cron_descriptor import Options, get_description

from qcluster.definitions.triggers import describe


def trigger(spec: Mapping[str, Any]) -> str:
    """``At 09:00, only on Monday (Europe/Paris)`` for a cron, else what ``jobs list``
    says (``every 30s``, ``at ...``). An expression the describer cannot read (our
    keywords, a seconds field) is shown as written."""
    text = describe(dict(spec))
    if spec.get("type") != "cron":
        return text
    said = _cron_words(str(spec.get("expr", "")))
    return text if said is None else f"{said} ({spec.get('tz', 'UTC')})"


@functools.lru_cache(maxsize=4096)
def _cron_words(expr: str) -> str | None:
    """The describer's words for a five-field ``expr``, or None. Cached: it reads its
    locale files on every call (about 0.6 ms), and a jobs page has 100 triggers, most of
    them alike."""
    if expr.startswith("@") or len(expr.split()) != 5:
        return None
    options = Options()
    options.use_24hour_time_format = True
    options.throw_exception_on_parse_error = True
    try:
        return str(get_description(expr, options))
    except Exception:  # the describer's own parse errors: show the expression
        return None


def _parse(value: str | float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def when(value: str | float | datetime | None) -> str:
    """``2026-12-02 09:00:00.123 UTC``, or an em dash."""
    if isinstance(value, datetime):
        value = value.timestamp()
    t = _parse(value)
    if t is None:
        return "—"
    moment = datetime.fromtimestamp(t, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d} UTC"


def ago(value: str | float | None) -> str:
    """``3 s ago``, ``in 2 min``, or an em dash."""
    t = _parse(value)
    if t is None:
        return "—"
    delta = t - time.time()
    text = seconds(abs(delta), short=True)
    return f"in {text}" if delta > 0 else f"{text} ago"


def seconds(value: float | None, short: bool = False) -> str:
    """A duration: ``12 ms``, ``3.4 s``, ``5 min``, ``2 h``, ``3 d``."""
    if value is None:
        return "—"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.0f} s" if short else f"{value:.1f} s"
    if value < 3600:
        return f"{value / 60:.0f} min"
    if value < 86400:
        return f"{value / 3600:.1f} h"
    return f"{value / 86400:.1f} d"


@dataclasses.dataclass(frozen=True)
class Chart:
    """An SVG polyline of the lateness of a job's runs, oldest on the left."""

    width: int
    height: int
    points: str
    top: str  # the label of the highest lateness
    count: int


def lateness_chart(runs: Sequence[Mapping[str, Any]], width: int = 600,
                   height: int = 120) -> Chart | None:
    """The chart of the runs that started (None if none did)."""
    values = [r["lateness"] for r in reversed(runs) if r.get("lateness") is not None]
    if not values:
        return None
    top = max(max(values), 0.001)
    step = width / max(1, len(values) - 1)
    pts = " ".join(f"{i * step:.1f},{height - v / top * (height - 4) - 2:.1f}"
                   for i, v in enumerate(values))
    return Chart(width, height, pts, seconds(top), len(values))
