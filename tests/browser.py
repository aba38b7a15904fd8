"""Load a page in headless Chromium over the DevTools protocol (a pipe: no port, no extra package).

Collects console messages, uncaught exceptions, browser log entries and every request's URL, so a test
can assert a page loads cleanly and offline, then evaluates JavaScript in it.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [  # the network is closed: without these Chromium floods refused connections
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--remote-debugging-pipe",
]


class Page:
    """A page opened in a fresh headless Chromium; use as a context manager."""

    def __init__(self, path: str | os.PathLike, *, timeout: float = 60.0):
        self.timeout = timeout
        self.events: list[dict] = []
        self._buf = b""
        self._ids = iter(range(1, 1 << 30))
        self._profile = tempfile.mkdtemp(prefix="tl-chromium-")
        to_chrome, self._cmd = os.pipe()  # Chromium reads commands from fd 3
        self._out, from_chrome = os.pipe()  # and writes replies to fd 4

        def fds():
            a, b = os.dup(to_chrome), os.dup(from_chrome)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                                     preexec_fn=fds, close_fds=False,  # keep fds 3 and 4
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            self._send(f"{domain}.enable", session=True)
        self._send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=True)
        self._wait(lambda m: m.get("method") == "Page.loadEventFired")

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        os.close(self._cmd)
        os.close(self._out)
        shutil.rmtree(self._profile, ignore_errors=True)

    def _send(self, method: str, params: dict | None = None, *, session: bool = False) -> dict:
        i = next(self._ids)
        msg = {"id": i, "method": method, "params": params or {}, **({"sessionId": self._session} if session else {})}
        os.write(self._cmd, json.dumps(msg).encode() + b"\0")
        reply = self._wait(lambda m: m.get("id") == i)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def _wait(self, done) -> dict:
        end = time.monotonic() + self.timeout
        while True:
            for msg in self._read():
                if done(msg):
                    return msg
            if time.monotonic() > end or self.proc.poll() is not None:
                raise TimeoutError("Chromium did not answer in time (or exited).")

    def _read(self) -> list[dict]:
        """The messages that arrive within 0.2 s (events are also kept in `self.events`)."""
        if select.select([self._out], [], [], 0.2)[0]:
            self._buf += os.read(self._out, 1 << 20)
        *raws, self._buf = self._buf.split(b"\0")
        msgs = [json.loads(r) for r in raws]
        self.events += [m for m in msgs if "method" in m]
        return msgs

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        result = self._send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                 "awaitPromise": True}, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def settle(self, seconds: float = 1.0) -> None:
        """Let scripts finish rendering, collecting the events they cause."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._read()

    def errors(self) -> list[str]:
        """Console errors and warnings, uncaught exceptions and error log entries (e.g. failed loads)."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.consoleAPICalled" and p["type"] in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
            elif e["method"] == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append(f"exception: {d.get('exception', {}).get('description', d.get('text'))}")
            elif e["method"] == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
                out.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        return out

    def requests(self) -> list[str]:
        """The URL of every request the page made."""
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def screenshot(self, path: str | os.PathLike) -> None:
        """A full-page PNG (for a person to look at; never committed)."""
        import base64

        data = self._send("Page.captureScreenshot", {"captureBeyondViewport": True, "format": "png"}, session=True)
        Path(path).write_bytes(base64.b64decode(data["data"]))
