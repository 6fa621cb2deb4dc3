"""Viewer benchmark in headless Chromium: prints one JSON line per figure (targets in DESIGN.md).

- frames per second of the 3D view with 500 machines updating at 10 Hz (viewer/bench.html, software
  WebGL), target >= 55;
- WebSocket message -> scene update delay on a running demo (aggregator events carry the time they
  were sent; the page records when it applied them).

    python bench/viewer.py [--machines 500] [--hz 10] [--seconds 10]
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from harness import emit
from playwright.sync_api import Page, sync_playwright

from gateway.broker import find_free_port

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]
EGIZ = str(Path(sys.executable).with_name("egiz"))
VIEWER = Path(__file__).resolve().parent.parent / "viewer"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--machines", type=int, default=500)
    ap.add_argument("--hz", type=float, default=10)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        frames(page, args.machines, args.hz, args.seconds)
        ws_delays(page, args.seconds)
        browser.close()


class QuietFiles(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def frames(page: Page, machines: int, hz: float, seconds: float) -> None:
    """The 3D view alone: its page served as static files, nothing else busy on this machine."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietFiles, directory=str(VIEWER)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/bench.html?machines={machines}&hz={hz}")
        page.wait_for_function("window.bench && window.bench.stats().frames > 10", timeout=60000)
        page.wait_for_timeout(2000)  # warm-up
        a = page.evaluate("window.bench.stats()")
        t0 = time.perf_counter()
        page.wait_for_timeout(seconds * 1000)
        b = page.evaluate("window.bench.stats()")
        el = time.perf_counter() - t0
    finally:
        server.shutdown()
    emit("viewer_3d_fps", (b["rendered"] - a["rendered"]) / el, "frames/s", ">= 55", machines=machines,
         update_hz=hz, draw_calls=b.get("drawCalls"), updates_per_s=round((b["updates"] - a["updates"]) / el))


def ws_delays(page: Page, seconds: float) -> None:
    """A running demo's events, from the aggregator's WebSocket to the line view's scene."""
    with tempfile.TemporaryDirectory(prefix="egiz-bench-") as tmp:
        agg, http = find_free_port(), find_free_port()
        demo = subprocess.Popen([EGIZ, "demo", "--data-dir", f"{tmp}/demo", "--sites", "1", "--lines", "1",
                                 "--nodes", "20", "--rate", "2", "--faults", "", "--aggregator-port", str(agg),
                                 "--http-port", str(http)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{agg}"
        try:
            for _ in range(300):
                try:
                    with urllib.request.urlopen(base + "/api/v1/sites", timeout=2) as r:
                        if json.loads(r.read())["items"]:
                            break
                except OSError:
                    pass
                time.sleep(0.1)
            page.goto(f"{base}/viewer/#/line/izmir-bakery/line-a")
            page.wait_for_selector("#machine-states li", state="attached", timeout=30000)
            page.wait_for_timeout(seconds * 1000)
            delays = np.array(page.evaluate("window.egiz.live.delays"), dtype=float)
            for q in (50, 99):
                if len(delays):
                    emit(f"ws_event_to_scene_p{q}", float(np.percentile(delays, q)), "ms", "reference",
                         samples=len(delays))
        finally:
            demo.send_signal(signal.SIGTERM)
            demo.wait(30)

if __name__ == "__main__":
    main()
