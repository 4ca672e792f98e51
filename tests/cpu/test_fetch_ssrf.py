"""The page fetch's SSRF guard against every spelling of a private address (issue 18, defect 1).

Live checks use loopback only: a raw TCP server on 127.0.0.1 counts every connection it accepts
and must accept none for a refused spelling, directly or through a redirect. The "public" site
is a second server on 127.0.0.2 that the tests declare public (the one fake, at the network edge).
Spellings of other private ranges are checked without connecting: check_url, the address
classifier, and the connector's socket factory, which refuses before a socket exists.

python -m pytest tests/cpu/test_fetch_ssrf.py -v
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cm_ray.config import SearchConfig
from cm_ray.data import fetch
from cm_ray.data.fetch import BlockedURL, address_problem, check_url, fetch_pages

PAGE = (b"<html><body><article><h1>Private</h1>" + b"<p>internal secret paragraph text.</p>" * 20
        + b"</article></body></html>")

# Every one of these is 127.0.0.1 (or ::1) once yarl/IDNA/the resolver have normalised it.
LOOPBACK_SPELLINGS = [
    "http://127.0.0.1:{p}/", "HTTP://127.0.0.1:{p}/", "https://127.0.0.1:{p}/",
    "http://localhost:{p}/", "http://LocalHost:{p}/", "http://localhost.:{p}/",
    "http://ｌｏｃａｌｈｏｓｔ:{p}/",  # fullwidth letters
    "http://①②⑦.0.0.1:{p}/",  # enclosed alphanumerics
    "http://１２７.０.０.１:{p}/",  # fullwidth digits
    "http://127。0。0。1:{p}/",  # U+3002 ideographic full stop
    "http://127．0．0．1:{p}/",  # U+FF0E fullwidth full stop
    "http://127｡0｡0｡1:{p}/",  # U+FF61 halfwidth ideographic full stop
    "http://127.0.0.1.:{p}/",  # trailing dot
    "http://2130706433:{p}/", "http://0x7f000001:{p}/", "http://0x7f.1:{p}/",
    "http://017700000001:{p}/", "http://0177.0.0.1:{p}/", "http://127.1:{p}/",
    "http://127.000.000.001:{p}/",  # zero-padded
    "http://good@127.0.0.1:{p}/", "http://user:pw@localhost:{p}/", "http://example.org@127.0.0.1:{p}/",
    "http://[::ffff:127.0.0.1]:{p}/", "http://[::ffff:7f00:1]:{p}/", "http://[0:0:0:0:0:ffff:7f00:1]:{p}/",
    "http://[::1]:{p}/",
]


class CountingServer:
    """A raw TCP server on 127.0.0.1 that answers HTTP 200 with PAGE and counts connections."""

    def __init__(self):
        self.connections = 0

    async def _handle(self, reader, writer):
        self.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(PAGE) + PAGE)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def target():
    async with CountingServer() as server:
        yield server


@pytest.fixture
async def public_site(monkeypatch):
    """A redirecting 'public' site on 127.0.0.2; returns (base URL, request paths)."""
    real = fetch.address_problem
    monkeypatch.setattr(fetch, "address_problem", lambda a: None if a == "127.0.0.2" else real(a))
    paths = []

    async def redirect(request):
        paths.append(request.path_qs)
        raise web.HTTPFound(request.query["to"])

    async def hop(request):
        paths.append(request.path)
        await asyncio.sleep(0.4)
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=PAGE, content_type="text/html")
        raise web.HTTPFound(f"/hop/{n - 1}")

    app = web.Application()
    app.router.add_get("/r", redirect)
    app.router.add_get("/hop/{n}", hop)
    server = TestServer(app, host="127.0.0.2")
    await server.start_server()
    yield f"http://127.0.0.2:{server.port}", paths
    await server.close()


def _cfg(allow_private: bool = False, timeout_s: float = 2.0) -> SearchConfig:
    return SearchConfig(fetch={"allow_private_urls": allow_private, "timeout_s": timeout_s})


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
async def test_every_loopback_spelling_is_refused_before_any_connection(target, spelling):
    url = spelling.format(p=target.port)
    (page,) = await fetch_pages([url], _cfg())
    assert page["text"] is None and page["error"].startswith("refused"), page
    assert target.connections == 0


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
async def test_the_connector_refuses_even_when_check_url_is_bypassed(target, spelling, monkeypatch):
    # The root of the guard: the connector checks the address of every socket it opens, so a URL
    # that slipped past check_url still never reaches the private server.
    monkeypatch.setattr(fetch, "check_url", lambda url, allow_private=False: None)
    (page,) = await fetch_pages([spelling.format(p=target.port)], _cfg())
    assert page["text"] is None and page["error"], page
    assert target.connections == 0


@pytest.mark.parametrize("spelling", LOOPBACK_SPELLINGS)
async def test_a_redirect_to_any_loopback_spelling_is_refused(target, public_site, spelling):
    base, paths = public_site
    to = spelling.format(p=target.port)
    (page,) = await fetch_pages([str(fetch.normalized_host(f"{base}/r")[0].with_query(to=to))], _cfg())
    assert len(paths) == 1  # the public hop was fetched ...
    assert page["text"] is None and page["error"].startswith("refused"), page
    assert target.connections == 0  # ... and the private one never connected


async def test_allowed_private_fetch_reaches_the_server(target):
    # The counting server does answer: the refusals above are the guard, not a dead server.
    (page,) = await fetch_pages([f"http://127.0.0.1:{target.port}/"], _cfg(allow_private=True))
    assert page["error"] is None and "internal secret" in page["text"] and target.connections == 1


async def test_the_deadline_covers_all_redirect_hops(public_site):
    base, paths = public_site
    # 4 hops of 0.4 s each: every hop is within 1 s, the whole fetch is not. A per-hop timeout
    # would follow all 4 and succeed; the one deadline stops it with hops left unvisited.
    (page,) = await fetch_pages([f"{base}/hop/3"], _cfg(timeout_s=1.0))
    assert page["text"] is None and "Timeout" in page["error"], page
    assert len(paths) <= 3
    (page,) = await fetch_pages([f"{base}/hop/1"], _cfg(timeout_s=1.5))  # 2 hops fit
    assert page["error"] is None and "internal secret" in page["text"]


PRIVATE_ADDRESSES = [
    "10.0.0.1", "172.16.0.1", "192.168.0.1", "127.255.255.254", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "255.255.255.255", "224.0.0.1", "198.18.0.1", "192.0.0.1", "240.0.0.1",
    "::", "::1", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12:3456::1", "fec0::1", "ff02::1",
    "100::1", "2001:db8::1",
    "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:0:7f00:1",  # v4-mapped / -translated
    "::127.0.0.1", "::10.0.0.1",  # v4-compatible
    "64:ff9b::127.0.0.1", "64:ff9b::10.0.0.1", "64:ff9b::169.254.169.254", "64:ff9b:1::a00:1",  # NAT64
    "2002:7f00:1::1", "2002:a00:1::1", "2002:c0a8:101::1",  # 6to4 of 127.0.0.1, 10.0.0.1, 192.168.1.1
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
]
PUBLIC_ADDRESSES = ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8", "64:ff9b::8.8.8.8",
                    "2002:808:808::1"]


@pytest.mark.parametrize("address", PRIVATE_ADDRESSES)
def test_private_addresses_are_refused_by_the_classifier_and_the_socket_factory(address):
    assert address_problem(address) is not None
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sockaddr = (address, 80, 0, 0) if family == socket.AF_INET6 else (address, 80)
    with pytest.raises(BlockedURL):
        fetch._sockaddr_guard(False)((family, socket.SOCK_STREAM, 6, "", sockaddr))


@pytest.mark.parametrize("address", PUBLIC_ADDRESSES)
def test_public_addresses_pass(address):
    assert address_problem(address) is None
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = fetch._sockaddr_guard(False)((family, socket.SOCK_STREAM, 6, "", (address, 80)))
    sock.close()  # created, never connected


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/", "http://１０.０.０.１/", "http://10。0。0。1/", "http://⑩.0.0.1/",
    "http://167772161/", "http://0xa.0.0.1/", "http://012.0.0.1/", "http://10.1/",
    "http://169.254.169.254/latest/meta-data/", "http://169.254.169.254./", "http://x@169.254.169.254/",
    "http://①⑥⑨.②⑤④.①⑥⑨.②⑤④/", "http://0/", "http://0.0.0.0/",
    "http://[::ffff:10.0.0.1]/", "http://[::10.0.0.1]/", "http://[64:ff9b::10.0.0.1]/",
    "http://[2002:a00:1::1]/", "http://[fe80::1%25eth0]/", "http://[fd00::1]/",
    "http://xn--/", "file:///etc/passwd", "ftp://example.org/", "javascript:alert(1)", "http:///x",
])
def test_check_url_refuses_private_and_malformed_spellings(url):
    with pytest.raises(BlockedURL, match="^refused"):
        check_url(url)


@pytest.mark.parametrize("url", ["http://example.org/a", "https://ｅｘａｍｐｌｅ.org/", "http://1.2.3.4.example/",
                                 "http://8.8.8.8/", "http://[2606:4700::1111]/", "https://bücher.de/x"])
def test_check_url_passes_public_urls(url):
    check_url(url)
