"""Refresh docs/ui-artifacts.png: screenshots of one flow run's artifacts in the Prefect UI.

    uv run python docs/ui_screenshot.py http://127.0.0.1:4200 FLOW_RUN_ID docs/ui-artifacts.png

Needs Debian's `chromium` on PATH and a Prefect server holding a finished run of the pipeline
(e.g. `audio-pipeline demo` with PREFECT_API_URL pointing at it). Drives headless Chromium over
its DevTools protocol, because a tab (the run's Artifacts tab) is a click, not a URL. Stacks
three views: the run's Artifacts tab, a sample table (the first `samples-*` key with errors if
any) and the run report; look at the result before committing it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

from PIL import Image, ImageDraw, ImageFont
from websockets.sync.client import connect

WIDTH, CAPTION = 1400, 26
CLICK_TAB = ("(() => {{ const t = [...document.querySelectorAll('li.p-tab')].find(e => e.textContent.trim() === "
             "'{0}'); if (!t) return 'no tab'; t.click(); return 'clicked'; }})()")
SCROLL_TO_TABS = ("(() => { const t = document.querySelector('ul.p-tab-navigation'); if (!t) return 'no tabs'; "
                  "t.scrollIntoView({block: 'start'}); return 'scrolled'; })()")


class Chromium:
    """Headless Chromium on a loopback DevTools port, one page driven by CDP calls."""

    def __init__(self) -> None:
        self.profile = tempfile.mkdtemp(prefix="ui-screenshot-")
        self.proc = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        port_file = os.path.join(self.profile, "DevToolsActivePort")
        deadline = time.monotonic() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port within 60 s")
            time.sleep(0.1)
        port = open(port_file).read().split()[0]
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10))
        self.ws = connect(next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"], max_size=None)
        self.calls = 0

    def call(self, method: str, **params):
        self.calls += 1
        self.ws.send(json.dumps({"id": self.calls, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.calls:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def screenshot(self, url: str, height: int, steps: tuple[str, ...] = (), settle_s: float = 7.0) -> Image.Image:
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)
        time.sleep(settle_s)  # the UI fetches its data after load; there is no event for "rendered"
        for step in steps:
            result = self.call("Runtime.evaluate", expression=step, returnByValue=True)["result"].get("value")
            if result not in ("clicked", "scrolled"):
                raise RuntimeError(f"{url}: {result}")
            time.sleep(2.5)
        png = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path = os.path.join(self.profile, "shot.png")
        with open(path, "wb") as f:
            f.write(png)
        return Image.open(path).convert("RGB")

    def close(self) -> None:
        if getattr(self, "ws", None):
            self.ws.close()
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


def artifacts_of(base: str, run_id: str) -> list[dict]:
    request = urllib.request.Request(
        f"{base}/api/artifacts/filter", method="POST", headers={"content-type": "application/json"},
        data=json.dumps({"artifacts": {"flow_run_id": {"any_": [run_id]}}}).encode(),
    )
    return json.load(urllib.request.urlopen(request, timeout=30))


def main(base: str, run_id: str, out: str) -> None:
    artifacts = {a["key"]: a for a in artifacts_of(base, run_id)}
    samples = sorted((k for k in artifacts if k.startswith("samples-")),
                     key=lambda k: ("failed" not in artifacts[k]["data"], k))
    if "run-report" not in artifacts or not samples:
        sys.exit(f"run {run_id} has no run-report or samples-* artifact: {sorted(artifacts)}")
    views = [
        ("The flow run's Artifacts tab: a bounded set of cards; the progress card says shards done/total "
         "without a click", f"{base}/runs/flow-run/{run_id}", 600, (CLICK_TAB.format("Artifacts"), SCROLL_TO_TABS)),
        (f"{samples[0]}: the folder's first lines (duration, tokens, quality flags, text), then its errors",
         f"{base}/artifacts/artifact/{artifacts[samples[0]]['id']}", 560, ()),
        ("run-report: new / reused / failed apart, files/s over the new work, the absolute results location, "
         "plots inline", f"{base}/artifacts/artifact/{artifacts['run-report']['id']}", 1180, ()),
    ]
    browser = Chromium()
    try:
        shots = [(caption, browser.screenshot(url, height, steps)) for caption, url, height, steps in views]
    finally:
        browser.close()
    sheet = Image.new("RGB", (WIDTH, sum(s.height + CAPTION + 2 for _, s in shots) - 2), "#5a5f66")
    draw, font, y = ImageDraw.Draw(sheet), ImageFont.load_default(size=15), 0
    for caption, shot in shots:
        draw.rectangle([0, y, WIDTH - 1, y + CAPTION - 1], fill="#1f2328")
        draw.text((10, y + 5), caption, fill="#e6edf3", font=font)
        sheet.paste(shot, (0, y + CAPTION))
        y += shot.height + CAPTION + 2
    # 128 colours: a third of the bytes, no visible loss on the UI's flat colours.
    sheet.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {sheet.size[0]}x{sheet.size[1]}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
