"""Screenshot a flow run's page in the Prefect UI with headless Chromium (Debian's
``chromium``): ``python scripts/ui_screenshot.py [--flow synthesize] [--out FILE.png]``.

Uses ``PREFECT_API_URL`` (the UI is the same address without ``/api``), picks the
newest run of the flow, opens its page in Chromium driven over the DevTools protocol,
waits (real time: the UI fetches its data after the page loads) and captures it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


async def newest_run(flow: str) -> str:
    """The id of the newest run of ``flow``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
    if not runs:
        sys.exit(f"no run of flow {flow!r} on {os.environ.get('PREFECT_API_URL')}")
    return str(runs[0].id)


async def capture(browser: str, url: str, width: int, height: int, wait_s: float) -> bytes:
    """A PNG of ``url`` after ``wait_s`` seconds, from a headless Chromium."""
    import websockets

    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(  # noqa: ASYNC220 - once, before any await
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stderr is not None
            deadline = time.monotonic() + 30
            ws_url = ""
            while not ws_url and time.monotonic() < deadline:
                line = proc.stderr.readline()
                if m := re.search(r"DevTools listening on (ws://\S+)", line):
                    ws_url = m.group(1)
            if not ws_url:
                sys.exit("chromium did not start its DevTools endpoint")
            port = ws_url.split(":")[2].split("/")[0]
            import httpx

            pages = httpx.get(f"http://127.0.0.1:{port}/json").json()  # noqa: ASYNC210
            page = next(p for p in pages if p["type"] == "page")
            async with websockets.connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                ids = iter(range(1, 1000))

                async def call(method: str, **params: object) -> dict[str, object]:
                    ident = next(ids)
                    await ws.send(json.dumps({"id": ident, "method": method, "params": params}))
                    while True:
                        reply = json.loads(await ws.recv())
                        if reply.get("id") == ident:
                            return reply.get("result", {})  # type: ignore[no-any-return]

                await call("Page.enable")
                await call("Page.navigate", url=url)
                await asyncio.sleep(wait_s)
                shot = await call("Page.captureScreenshot", format="png")
                return base64.b64decode(str(shot["data"]))
        finally:
            proc.terminate()
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--flow", default="synthesize")
    parser.add_argument("--run-id", help="A flow run id (default: the flow's newest run).")
    parser.add_argument("--out", default="docs/img/flow-run.png")
    parser.add_argument("--size", default="1440,1000", help="Window size, W,H.")
    parser.add_argument("--wait-s", type=float, default=8.0, help="Seconds to let the UI load.")
    args = parser.parse_args()
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        sys.exit("set PREFECT_API_URL (mathmill server up prints it)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        sys.exit("chromium is not installed (Debian: apt-get install chromium)")
    run_id = args.run_id or asyncio.run(newest_run(args.flow))
    url = f"{api.removesuffix('/api')}/runs/flow-run/{run_id}"
    width, height = (int(v) for v in args.size.split(","))
    png = asyncio.run(capture(browser, url, width, height, args.wait_s))
    with open(args.out, "wb") as f:
        f.write(png)
    print(f"{url} -> {args.out}")


if __name__ == "__main__":
    main()
