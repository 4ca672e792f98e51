"""Optional page fetch of the top search hits + main-text extraction (trafilatura).

Limits: ``search.fetch.max_bytes`` per page (the body is read in chunks and cut there), one
overall deadline of ``search.fetch.timeout_s`` per page (every redirect hop and the body
included), at most 3 redirects.

SSRF guard (refusals unless ``search.fetch.allow_private_urls``, for tests):

- ``check_url`` parses a URL with yarl exactly as aiohttp will (IDNA/NFKC: fullwidth digits,
  U+3002 dots and "①②⑦" all become ASCII; userinfo and a trailing dot dropped), so an address
  in any spelling is classified as the address it is. Numeric IPv4 spellings other than the
  dotted quad (2130706433, 0x7f.1, 0177.0.0.1, 127.1), ``localhost``/``*.localhost`` and hosts
  IDNA rejects are refused outright; only http(s) is fetched.
- ``address_problem`` classifies an address with ``ipaddress``: anything not global (private,
  loopback, link-local, CGNAT, reserved, site-local, multicast, unspecified) is refused, and an
  IPv4 address embedded in IPv6 (v4-mapped, v4-compatible, NAT64 64:ff9b::/96, 6to4 2002::/16,
  Teredo 2001::/32) is classified on its own.
- ``guarded_connector``: the resolver refuses a name if any of its addresses is refused, and the
  socket factory checks the address of every socket the connector opens — literal or resolved,
  first hop or redirect — so nothing reaches a refused address even past ``check_url``.
- Each redirect target is checked again (``check_url`` + the connector).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from typing import Any

from cm_ray.http import error_text, read_body

MAX_REDIRECTS = 3
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)


class BlockedURL(OSError):
    """The URL's scheme or target address is not allowed."""


def _ipv4_problem(ip: ipaddress.IPv4Address) -> str | None:
    if ip.is_multicast:
        return "multicast"
    if not ip.is_global:
        return "not a public address"
    return None


def address_problem(address: str) -> str | None:
    """Why ``address`` (an IP literal, optionally with a %zone) may not be fetched, or None."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv4Address):
        return _ipv4_problem(ip)
    embedded: list[tuple[str, ipaddress.IPv4Address]] = []
    if ip.ipv4_mapped is not None:
        embedded.append(("IPv4-mapped", ip.ipv4_mapped))
    elif ip in _NAT64:
        embedded.append(("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
    elif ip.sixtofour is not None:
        embedded.append(("6to4", ip.sixtofour))
    elif ip.teredo is not None:
        embedded += [("Teredo server", ip.teredo[0]), ("Teredo client", ip.teredo[1])]
    elif int(ip) >> 32 == 0 and int(ip) > 1:
        return f"IPv4-compatible form of {ipaddress.IPv4Address(int(ip))} (deprecated)"
    for kind, v4 in embedded:
        why = _ipv4_problem(v4)
        if why:
            return f"{kind} form of {v4}: {why}"
    if ip.ipv4_mapped is not None or ip in _NAT64 or ip.sixtofour is not None:
        return None  # these reach the embedded (public) IPv4 address; same verdict on any Python
    if ip in _NAT64_LOCAL:
        return "local-use NAT64"
    if ip.is_multicast:
        return "multicast"
    if (not ip.is_global or ip.is_reserved or ip.is_site_local or ip.is_link_local
            or ip.is_loopback or ip.is_unspecified):
        return "not a public address"
    return None


def is_public(address: str) -> bool:
    return address_problem(address) is None


def normalized_host(url: str) -> tuple[Any, str]:
    """``(yarl.URL, host)`` as aiohttp will connect: IDNA-encoded, no trailing dot."""
    import yarl

    try:
        parsed = yarl.URL(url)
        host, _ = parsed.raw_host, parsed.host  # .host decodes IDNA: a broken label raises
    except (ValueError, UnicodeError) as e:
        raise BlockedURL(f"refused {url!r}: invalid URL ({e})") from None
    return parsed, (host or "").rstrip(".").lower()


def check_url(url: str, allow_private: bool = False) -> None:
    """Refuse non-http(s) URLs, non-canonical numeric hosts and literal refused addresses (names
    are checked by the connector at resolve and at connect time)."""
    parsed, host = normalized_host(url)
    if parsed.scheme not in ("http", "https") or not host:
        raise BlockedURL(f"refused {url!r}: only http(s) URLs with a host are fetched")
    if (host == "localhost" or host.endswith(".localhost")) and not allow_private:
        raise BlockedURL(f"refused {url!r}: {host} is a loopback name (RFC 6761)")
    try:
        ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        # A host whose last label is a number is an IPv4 address to every resolver (WHATWG URL,
        # inet_aton); only the dotted quad is accepted, the rest is a disguise.
        if _NUMERIC_LABEL.match(host.rsplit(".", 1)[-1]):
            raise BlockedURL(f"refused {url!r}: {host} is not a canonical IPv4 address") from None
        return
    why = address_problem(host)
    if why and not allow_private:
        raise BlockedURL(f"refused {url!r}: {host} ({why})")


def _sockaddr_guard(allow_private: bool):
    def socket_factory(addr_info):
        family, type_, proto, _, sockaddr = addr_info
        why = address_problem(sockaddr[0])
        if why and not allow_private:
            raise BlockedURL(f"refused connection to {sockaddr[0]}: {why}")
        return socket.socket(family=family, type=type_, proto=proto)

    return socket_factory


def guarded_connector(allow_private: bool, **kwargs: Any):
    """A TCPConnector whose resolver and socket factory refuse non-public addresses."""
    import aiohttp

    class GuardedResolver(aiohttp.ThreadedResolver):
        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list:
            infos = await super().resolve(host, port, family)
            bad = [(i["host"], w) for i in infos if (w := address_problem(i["host"]))]
            if bad and not allow_private:
                raise BlockedURL(f"refused {host}: resolves to {bad[0][0]} ({bad[0][1]})")
            return infos

    return aiohttp.TCPConnector(resolver=GuardedResolver(),
                                socket_factory=_sockaddr_guard(allow_private), **kwargs)


def decode_page(body: bytes, charset: str | None) -> str:
    """``body`` as storable text: the declared charset if Python knows it as a text encoding,
    else UTF-8 if it decodes, else charset_normalizer's guess, else UTF-8 with replacement
    characters. Lone surrogates (UTF-7 can make them; Arrow cannot store them) become '?'."""
    if charset:
        try:
            return body.decode(charset, "replace").encode("utf-8", "replace").decode("utf-8")
        except (LookupError, ValueError, TypeError):
            pass  # a bogus or non-text charset= is the page's problem, not the stage's
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        from charset_normalizer import from_bytes

        best = from_bytes(body[:200_000]).best()
        if best is not None:
            return body.decode(best.encoding, "replace")
    except (ImportError, LookupError, ValueError):
        pass
    return body.decode("utf-8", "replace")


def extract_text(html: str, url: str | None = None) -> str | None:
    """Main text of an HTML page (boilerplate removed), or None when nothing is left."""
    import trafilatura

    return trafilatura.extract(html, url=url, include_comments=False, include_tables=False)


async def _download(session: Any, url: str, cfg: Any) -> tuple[str, str | None, str | None]:
    """``(final url, html, error)`` after following at most MAX_REDIRECTS checked redirects."""
    import yarl

    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, cfg.fetch.allow_private_urls)
        async with session.get(yarl.URL(url), allow_redirects=False) as resp:
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                try:
                    url = str(resp.url.join(yarl.URL(resp.headers["Location"])))
                except (ValueError, UnicodeError) as e:
                    return url, None, f"refused redirect: invalid Location ({e})"
                continue
            if resp.status != 200:
                return url, None, f"HTTP {resp.status}"
            body = await read_body(resp, cfg.fetch.max_bytes, cut=True)  # keep what fits; the extractor copes
            return url, decode_page(body, resp.charset), None
    return url, None, f"more than {MAX_REDIRECTS} redirects"


def _refusal(e: BaseException) -> str | None:
    """Our refusal behind an aiohttp connection error, if that is what it is."""
    for err in (getattr(e, "os_error", None), e.__cause__):
        # Several refused addresses of one host come back as one "Multiple exceptions" OSError.
        if isinstance(err, BlockedURL) or str(err).startswith("Multiple exceptions: refused "):
            return str(err)
    return None


async def fetch_pages(urls: list[str], cfg: Any) -> list[dict]:
    """Fetch and extract ``urls`` concurrently; one ``{url, final_url, text, error}`` per URL, in
    order. ``url`` is the URL asked for (the hit's, what a reader joins the page on) and
    ``final_url`` the last one requested after redirects, where the text came from (null when
    the fetch failed before any answer).
    A page that fails in any way is that page's error, never the caller's exception."""
    import aiohttp

    session = aiohttp.ClientSession(
        connector=guarded_connector(cfg.fetch.allow_private_urls),
        headers={"User-Agent": "cm_ray/0.1 (+research crawler)"})
    limit = cfg.fetch.timeout_s

    async def one(url: str) -> dict:
        def page(text: str | None, error: str | None, final: str | None = None) -> dict:
            return {"url": url, "final_url": final, "text": text, "error": error}

        try:
            final, html, error = await asyncio.wait_for(_download(session, url, cfg), limit)
        except BlockedURL as e:
            return page(None, str(e))
        except (asyncio.TimeoutError, TimeoutError):
            return page(None, f"TimeoutError: not fetched within {limit:g}s (all redirects included)")
        except aiohttp.ClientConnectorError as e:
            return page(None, _refusal(e) or f"connection error: {e}")
        except Exception as e:  # noqa: BLE001 - ClientError, or a hostile answer aiohttp chokes on
            return page(None, error_text(e))
        if html is None:
            return page(None, error, final)
        try:
            text = await asyncio.to_thread(extract_text, html, final)
        except Exception as e:  # noqa: BLE001 - a hostile page must not take the stage down
            return page(None, f"extraction failed: {error_text(e)}", final)
        return page(text, None if text else "no main text", final)

    try:
        return list(await asyncio.gather(*(one(u) for u in urls)))
    finally:
        await session.close()
