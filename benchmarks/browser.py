"""Run an exported page in headless Chromium, or its model in onnxruntime-web under Node.js, and
collect what they report (tests/test_web.py and benchmarks/web_bench.py).

A local HTTP server on 127.0.0.1 serves the page folder, plus the test input (``pixels.u8``, raw
uint8 [C, H, W], or ``image.png``, which the page decodes as it does a dropped image) and a
``/report`` endpoint the page POSTs its JSON result to, through the page's test hook
(``?pixels=...&report=...`` or ``?image=...&report=...``). Chromium runs with a fresh profile and no background networking.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def chromium() -> str | None:
    """$SLOTPACK_CHROMIUM, else the first Chromium on PATH."""
    if os.environ.get("SLOTPACK_CHROMIUM"):
        return os.environ["SLOTPACK_CHROMIUM"]
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def _handler(folder: Path, files: dict[str, bytes], results: queue.Queue):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            body = files.get(self.path.split("?")[0].lstrip("/"))
            if body is not None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(204)
            self.end_headers()
            results.put(json.loads(body))

        def log_message(self, *args):
            pass

    return functools.partial(Handler, directory=str(folder))


def run_page(
    folder: Path,
    pixels: bytes | None = None,
    *,
    png: bytes | None = None,
    model: str | None = None,
    again: int = 0,
    timeout: float = 120.0,
    browser: str | None = None,
) -> dict:
    """Open ``folder``'s page in headless Chromium on ``pixels`` (uint8 [C, H, W]) or on the
    image file ``png``; its report. ``model`` names another ONNX file in ``folder`` for the page
    to load instead; ``again`` asks it to time that many more session creations."""
    browser = browser or chromium()
    if browser is None:
        raise FileNotFoundError(
            "no Chromium found (apt-get install chromium, or $SLOTPACK_CHROMIUM)"
        )
    if (pixels is None) == (png is None):
        raise ValueError("pass pixels or png")
    files = {"pixels.u8": pixels} if pixels is not None else {"image.png": png}
    results: queue.Queue = queue.Queue()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(folder, files, results))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    given = "pixels=pixels.u8" if pixels is not None else "image=image.png"
    url = f"http://127.0.0.1:{server.server_port}/index.html?{given}&report=report"
    if model is not None:
        url += f"&model={model}"
    if again:
        url += f"&again={again}"
    with tempfile.TemporaryDirectory(prefix="slotpack-chromium-") as profile:
        flags = [
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
        ]
        proc = subprocess.Popen(
            [browser, *flags, url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            return results.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no report from the page within {timeout:.0f} s") from None
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            server.shutdown()
            server.server_close()


NODE_SCRIPT = Path(__file__).with_name("ort_node.mjs")


def run_node(dist: Path, model: Path, x, *, timeout: float = 300.0) -> dict:
    """onnxruntime-web's wasm build in Node.js on the float32 input ``x``: its logits' bits and
    session creation time. Raises FileNotFoundError without ``node``."""
    node = shutil.which("node")
    if node is None:
        raise FileNotFoundError("no node on PATH")
    with tempfile.NamedTemporaryFile(suffix=".f32") as f:
        f.write(x.astype("<f4").tobytes())
        f.flush()
        out = subprocess.run(
            [node, str(NODE_SCRIPT), str(dist), str(model), f.name, json.dumps(list(x.shape))],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])
