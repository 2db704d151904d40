"""The embedded service's tasks (the embedded default: no broker server)."""

from __future__ import annotations

import urllib.request

from greenworker import App

app = App("embedded", config={"worker_block_policy": "log"})  # never exit the host program


@app.task(name="embedded.fetch")
def fetch(url: str) -> dict[str, int | str]:
    """GET a URL (cooperative: the program patched sockets) and report its size."""
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read()
    return {"url": url, "status": response.status, "bytes": len(body)}
