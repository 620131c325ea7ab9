"""`make report-check`: look at a comparison report as a person would.

Builds a small comparison with the seeded test models (SAN against two SAM + Alpha-CLIP
variants on a synthetic dataset of coloured shapes), opens its report.html in headless
Chromium (Debian's package, installed when missing) and drives it over the DevTools protocol
(``--remote-debugging-pipe``: NUL-separated JSON on file descriptors 3 and 4), so that every
request the page makes and everything it logs is seen. Fails when the page logged an error,
failed a load, or loaded anything from outside the report's folder; writes a full-page
screenshot to look at.

    python tests/report_check.py [--out outputs/report-check]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
CHROMIUM = "chromium"


def ensure_chromium() -> str:
    found = shutil.which(CHROMIUM)
    if found:
        return found
    print("installing Debian's chromium (apt-get) ...", file=sys.stderr)
    subprocess.run(["apt-get", "update", "-q"], check=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, env={**os.environ,
                                                                                   "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which(CHROMIUM) or sys.exit("chromium did not install")


def build_comparison(out: Path) -> Path:
    """A small comparison of the seeded models on coloured shapes; returns its folder. The
    entries are chosen to disagree (a SAN seeded so that it names two classes, SAM with and
    without alpha), so every section of the report has something in it."""
    from helpers import write_seeded_alpha_clip, write_seeded_sam, write_seeded_san, write_shapes_dataset

    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    san = write_seeded_san(models / "san.pth", seed=1)
    clip, alpha = write_seeded_alpha_clip(models)
    sam = write_seeded_sam(models / "sam.pth")
    images, labels, classes = write_shapes_dataset(out / "data", 4, seed=3, size=96)
    sam_options = (f"weights={alpha},clip_weights={clip},sam_weights={sam},points_per_side=2,pred_iou_thresh=0,"
                   "stability_score_thresh=0,fill=nearest")
    report = out / "comparison"
    command = [sys.executable, "-m", "ovss_cli", "compare", "--images", str(images), "--labels", str(labels),
               "--classes-file", str(classes), "--variant", f"san=san:weights={san},resize_short=none",
               "--variant", f"sam blur, no alpha=sam:{sam_options},region=blur,no_alpha=true",
               "--variant", f"sam crop=sam:{sam_options},region=crop", "--out", str(report), "--device", "cpu"]
    subprocess.run(command, check=True)
    return report


class DevTools:
    """The DevTools protocol over Chromium's pipe."""

    def __init__(self, chromium: str, profile: Path):
        self.to_browser_r, self.to_browser_w = os.pipe()
        self.from_browser_r, self.from_browser_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]

        def fds():
            os.dup2(self.to_browser_r, 3)
            os.dup2(self.from_browser_w, 4)

        self.proc = subprocess.Popen([chromium, *flags], preexec_fn=fds, pass_fds=(3, 4),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(self.to_browser_r)
        os.close(self.from_browser_w)
        self.next_id = 0
        self.buffer = b""
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(method)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        for event in self.events:
            if event.get("method") == method:
                return event
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self._read()
            self.events.append(event)
            if event.get("method") == method:
                return event
        raise TimeoutError(method)

    def _read(self) -> dict:
        while b"\0" not in self.buffer:
            chunk = os.read(self.from_browser_r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        self.proc.wait(timeout=30)


def look_at(report: Path, screenshot: Path, chromium: str) -> list[str]:
    """Open the report; return the problems seen (errors logged, failed or outside loads)."""
    page_url = report.resolve().as_uri()
    folder = report.resolve().parent
    with tempfile.TemporaryDirectory() as profile:
        tools = DevTools(chromium, Path(profile))
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Network", "Runtime", "Log"):
                tools.send(f"{domain}.enable", session=session)
            tools.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 900, "deviceScaleFactor": 1,
                                                              "mobile": False}, session=session)
            tools.send("Page.navigate", {"url": page_url}, session=session)
            tools.wait_for("Page.loadEventFired")
            height = tools.send("Runtime.evaluate", {"expression": "document.documentElement.scrollHeight",
                                                     "returnByValue": True}, session=session)["result"]["value"]
            tools.send("Runtime.evaluate", {"expression": "Promise.all([...document.images].map(i => i.decode()))",
                                            "awaitPromise": True}, session=session)
            tools.send("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": int(height),
                                                              "deviceScaleFactor": 1, "mobile": False}, session=session)
            shot = tools.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                              session=session)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            broken = tools.send("Runtime.evaluate", {
                "expression": "[...document.images].filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)",
                "returnByValue": True}, session=session)["result"]["value"]
        finally:
            tools.close()
    problems = [f"image did not load: {src}" for src in broken]
    for event in tools.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            parsed = urlparse(url)
            if url == page_url or parsed.scheme == "data":
                continue
            path = Path(unquote(parsed.path)).resolve() if parsed.scheme == "file" else None
            if path is None or folder not in path.parents:
                problems.append(f"loaded from outside the report's folder: {url}")
        elif method == "Network.loadingFailed":
            problems.append(f"a load failed: {params.get('errorText')} ({params.get('requestId')})")
        elif method == "Runtime.exceptionThrown":
            problems.append(f"script error: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            problems.append(f"console {params['type']}: {[a.get('value') for a in params.get('args', [])]}")
        elif method == "Log.entryAdded" and params["entry"].get("level") in ("error", "warning"):
            problems.append(f"log {params['entry']['level']}: {params['entry'].get('text')} {params['entry'].get('url', '')}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE.parent / "outputs" / "report-check")
    args = parser.parse_args()
    chromium = ensure_chromium()
    if args.out.exists():
        shutil.rmtree(args.out)
    report = build_comparison(args.out) / "report.html"
    screenshot = args.out / "report.png"
    problems = look_at(report, screenshot, chromium)
    for problem in problems:
        print(f"report-check: {problem}", file=sys.stderr)
    print(f"report-check: {'FAILED' if problems else 'ok'}; screenshot {screenshot}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
