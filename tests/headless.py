"""A real headless Chromium driven over the Chrome DevTools Protocol: open a page from disk, collect
its console errors and failed loads, read every image's natural width, take a screenshot."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def open_page(page: Path, screenshot: Path, width: int = 1200, max_height: int = 2400, timeout: float = 60) -> dict:
    """Load `page` in headless Chromium; return {"errors": [...], "images": [[src, naturalWidth], ...]}
    and write a PNG screenshot of the top of the page (at most `max_height` px)."""
    import websocket

    # Chromium's helper processes may still be writing the profile when it is removed
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([find_browser(), "--headless=new", "--no-sandbox", "--disable-gpu",
                                 "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                 "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            url = _devtools_url(proc, timeout)
            ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
            cdp = _Session(ws)
            target = cdp.call("Target.createTarget", url="about:blank")["targetId"]
            cdp.session = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                cdp.call(f"{domain}.enable")
            cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False)
            cdp.call("Page.navigate", url=page.resolve().as_uri())
            cdp.wait_for("Page.loadEventFired", timeout)
            images = json.loads(cdp.call("Runtime.evaluate", returnByValue=True, expression=(
                "JSON.stringify([...document.images].map(i => [i.getAttribute('src'), i.naturalWidth]))"))["result"]["value"])
            height = min(int(cdp.call("Page.getLayoutMetrics")["cssContentSize"]["height"]), max_height)
            shot = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            ws.close()
            return {"errors": cdp.errors, "images": images}
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the browser and its helper processes
            proc.wait()


def _devtools_url(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if m := re.search(r"DevTools listening on (ws://\S+)", line):
            return m.group(1)
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"chromium did not start (exit {proc.poll()})")


class _Session:
    """Numbered CDP calls on one websocket; events seen meanwhile are kept, errors collected."""

    def __init__(self, ws) -> None:
        self.ws, self.session, self.next_id = ws, None, 0
        self.events, self.errors = [], []

    def _receive(self) -> dict:
        msg = json.loads(self.ws.recv())
        method = msg.get("method")
        if method == "Runtime.consoleAPICalled" and msg["params"]["type"] in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in msg["params"]["args"]))
        elif method == "Runtime.exceptionThrown":
            self.errors.append(msg["params"]["exceptionDetails"].get("text", "exception"))
        elif method == "Log.entryAdded" and msg["params"]["entry"]["level"] == "error":
            entry = msg["params"]["entry"]
            self.errors.append(f"{entry.get('text')} {entry.get('url', '')}".strip())
        if method:
            self.events.append(method)
        return msg

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = self._receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def wait_for(self, event: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while event not in self.events:
            if time.monotonic() > deadline:
                raise TimeoutError(event)
            self._receive()
