"""The crawler's app and task: fetch a page, queue a crawl of each new link.

The app uses the embedded default (no broker configured): kombu's filesystem
transport and LMDB results under the data directory.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

from greenworker import App

app = App("scrape")

#: URLs this worker process has already queued: the worker is one process, so
#: a plain set is the whole de-duplication.
_seen: set[str] = set()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.extend(value for name, value in attrs if name == "href" and value)


def links_in(html: str, base: str) -> list[str]:
    """Absolute same-site links of a page, without fragments, in page order."""
    parser = _Links()
    parser.feed(html)
    site = urlsplit(base).netloc
    found = []
    for href in parser.hrefs:
        url = urljoin(base, href).split("#", 1)[0]
        if urlsplit(url).netloc == site:
            found.append(url)
    return found


@app.task(name="scrape.crawl")
def crawl(url: str) -> dict[str, Any]:
    """Fetch ``url``; queue a crawl of every new same-site link; report what was found."""
    _seen.add(url)
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        return {"url": url, "error": f"HTTP {exc.code}", "children": []}
    except (urllib.error.URLError, OSError) as exc:
        return {"url": url, "error": str(exc), "children": []}
    children = []
    links = links_in(body.decode("utf-8", "replace"), url)
    for link in links:
        if link not in _seen:
            _seen.add(link)
            children.append(crawl.delay(link).id)
    return {
        "url": url,
        "status": status,
        "bytes": len(body),
        "links": len(links),
        "children": children,
    }
