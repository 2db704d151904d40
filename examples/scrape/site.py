"""The site the demo crawls: N generated pages served on 127.0.0.1 by the stdlib.

Page i links to a few others (so the crawl fans out and meets pages it has
seen), and every tenth page links to a page that does not exist: those 404s
are on purpose, and the summary counts them apart as expected.  Each response
waits ``latency`` seconds, as a real site would, so concurrency is what makes
the crawl fast.
"""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def page_links(index: int, pages: int) -> list[str]:
    targets = {(index * 7 + 1) % pages, (index * 13 + 5) % pages, (index + 1) % pages}
    links = [f"/page/{t}" for t in sorted(targets)]
    if index % 10 == 0:
        links.append(f"/missing/{index}")
    return links


def missing_pages(pages: int) -> int:
    return len([i for i in range(pages) if i % 10 == 0])


class Site:
    """``with Site(pages=200) as site: site.url`` serves until the block ends."""

    def __init__(self, pages: int = 200, latency: float = 0.02) -> None:
        self.pages = pages
        self.latency = latency
        self.hits = 0
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.hits += 1
                time.sleep(site.latency)  # cooperative: the process is monkeypatched
                parts = self.path.strip("/").split("/")
                if len(parts) == 2 and parts[0] == "page" and parts[1].isdigit():
                    index = int(parts[1])
                    if index < site.pages:
                        links = "".join(
                            f'<li><a href="{h}">{h}</a></li>' for h in page_links(index, site.pages)
                        )
                        self._send(200, f"<html><body><h1>Page {index}</h1><ul>{links}</ul>")
                        return
                self._send(404, "<html><body>not found</body></html>")

            def _send(self, code: int, html: str) -> None:
                data = html.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: the demo prints its own progress

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/page/0"

    def __enter__(self) -> Site:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
