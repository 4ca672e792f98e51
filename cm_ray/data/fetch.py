"""Optional page fetch of the top search hits + main-text extraction (trafilatura).

Limits: ``search.fetch.max_bytes`` per page (the body is read in chunks and cut there),
``search.fetch.timeout_s`` per page, at most 3 redirects. SSRF guard: only http(s); every host,
and every redirect target, must resolve to public addresses. Private, loopback, link-local,
reserved and multicast targets are refused unless ``search.fetch.allow_private_urls`` (tests). The check
runs inside the connector's resolver, i.e. on the address actually connected to, so a name that
re-resolves to a private address between check and connect is still refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urljoin, urlsplit

MAX_REDIRECTS = 3


class BlockedURL(OSError):
    """The URL's scheme or target address is not allowed."""


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_url(url: str, allow_private: bool = False) -> None:
    """Refuse non-http(s) URLs and literal non-public IPs (names are checked at resolve time)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BlockedURL(f"refused {url!r}: only http(s) URLs with a host are fetched")
    try:
        ipaddress.ip_address(parts.hostname)
    except ValueError:
        return
    if not allow_private and not is_public(parts.hostname):
        raise BlockedURL(f"refused {url!r}: {parts.hostname} is not a public address")


def guarded_resolver(allow_private: bool):
    """An aiohttp resolver that refuses names resolving to any non-public address."""
    import aiohttp

    class GuardedResolver(aiohttp.ThreadedResolver):
        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list:
            infos = await super().resolve(host, port, family)
            bad = [i["host"] for i in infos if not is_public(i["host"])]
            if bad and not allow_private:
                raise BlockedURL(f"refused {host}: resolves to non-public {bad[0]}")
            return infos

    return GuardedResolver()


def extract_text(html: str, url: str | None = None) -> str | None:
    """Main text of an HTML page (boilerplate removed), or None when nothing is left."""
    import trafilatura

    return trafilatura.extract(html, url=url, include_comments=False, include_tables=False)


async def _fetch_one(session: Any, url: str, cfg: Any) -> dict:
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, cfg.fetch.allow_private_urls)
        async with session.get(url, allow_redirects=False) as resp:
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                url = urljoin(url, resp.headers["Location"])
                continue
            if resp.status != 200:
                return {"url": url, "text": None, "error": f"HTTP {resp.status}"}
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) >= cfg.fetch.max_bytes:
                    del body[cfg.fetch.max_bytes:]  # keep what fits; the extractor copes
                    break
            html = body.decode(resp.charset or "utf-8", "replace")
        text = await asyncio.to_thread(extract_text, html, url)
        return {"url": url, "text": text, "error": None if text else "no main text"}
    return {"url": url, "text": None, "error": f"more than {MAX_REDIRECTS} redirects"}


async def fetch_pages(urls: list[str], cfg: Any, session: Any = None) -> list[dict]:
    """Fetch and extract ``urls`` concurrently; one ``{url, text, error}`` per URL, in order."""
    import aiohttp

    own = session is None
    if own:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(resolver=guarded_resolver(cfg.fetch.allow_private_urls)),
            timeout=aiohttp.ClientTimeout(total=cfg.fetch.timeout_s),
            headers={"User-Agent": "cm_ray/0.1 (+research crawler)"})

    async def one(url: str) -> dict:
        try:
            return await _fetch_one(session, url, cfg)
        except BlockedURL as e:
            return {"url": url, "text": None, "error": str(e)}
        except aiohttp.ClientConnectorError as e:
            # aiohttp wraps resolver errors; surface ours as a refusal.
            cause = e.__cause__ or getattr(e, "os_error", None)
            reason = str(cause) if isinstance(cause, BlockedURL) else f"connection error: {e}"
            return {"url": url, "text": None, "error": reason}
        except (asyncio.TimeoutError, aiohttp.ClientError) as e:
            return {"url": url, "text": None, "error": f"{type(e).__name__}: {e}"}

    try:
        return list(await asyncio.gather(*(one(u) for u in urls)))
    finally:
        if own:
            await session.close()
