"""``python -m bench.scrape``: what the ``/metrics`` endpoint costs the node it runs on
(issue 17): CPU per scrape, and the share of a core at one scrape every ``--interval``.

This process serves :class:`qcluster.metrics.MetricsServer` as a node does, with every
series a leader and a worker of a busy cluster have (each label realised, every histogram
observed), and does nothing else; a child process scrapes it ``--scrapes`` times, one
after the other, over a new connection each time (as Prometheus does). The CPU this
process spent meanwhile (``time.process_time``: all its threads) divided by the scrapes is
the cost of one; the child's own CPU is not counted.

The per-fire side of the metrics is not here: the leader counts its fires once per batch
(``FIRES.labels(...).inc(n)``), so at 2,000 fires/s that is a few calls per pass.
``python -m bench steady --jobs 2000 --metrics`` runs the whole cluster with every node
scraped each second; compare its CPU per fire with a run without ``--metrics``.

    python -m bench.scrape                      # 2,000 scrapes, share at one a second
    python -m bench.scrape --scrapes 200 --interval 15
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from qcluster import metrics
from tests.servers.base import free_port

CHILD = """
import sys, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
size = 0
for _ in range(n):
    with urllib.request.urlopen(url, timeout=10) as r:
        size = len(r.read())
print(size)
"""


def fill_series() -> None:
    """Every series a busy node shows: the histograms observed across their buckets, the
    gauges set (the labelled counters are realised by ``qcluster.metrics`` itself)."""
    for i in range(1000):
        value = (i % 100) / 10.0
        metrics.LATENESS.observe(value)
        metrics.RUN_SECONDS.observe(value)
        metrics.PASS_SECONDS.observe(value / 100)
        metrics.DISPATCH_SECONDS.observe(value / 100)
    metrics.IS_LEADER.set(1)
    metrics.EPOCH.set(42)
    metrics.LIVE_WORKERS.set(2)


def measure(scrapes: int) -> dict[str, float]:
    fill_series()
    port = free_port()
    server = metrics.MetricsServer("127.0.0.1", port)
    server.start()
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        subprocess.run([sys.executable, "-c", CHILD, url, "3"], check=True,
                       capture_output=True)  # warm: the first answer builds caches
        cpu0, wall0 = time.process_time(), time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD, url, str(scrapes)], check=True,
                              capture_output=True, text=True)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        server.close()
    return {"scrapes": scrapes, "bytes": int(done.stdout.strip()),
            "cpu_us_per_scrape": cpu / scrapes * 1e6, "wall_ms_per_scrape": wall / scrapes * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scrape", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scrapes", type=int, default=2000)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between scrapes")
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    a = p.parse_args(argv)
    if a.scrapes < 1 or a.interval <= 0:
        p.error("--scrapes must be at least 1 and --interval above 0")
    r = measure(a.scrapes)
    share = r["cpu_us_per_scrape"] / 1e6 / a.interval
    r.update(interval=a.interval, core_share=share)
    print(f"/metrics: {r['bytes']:,} bytes; {r['cpu_us_per_scrape']:,.0f} µs CPU and "
          f"{r['wall_ms_per_scrape']:.2f} ms wall per scrape ({a.scrapes:,} scrapes); "
          f"one every {a.interval:g} s costs {share:.3%} of a core")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "scrape.json").write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
