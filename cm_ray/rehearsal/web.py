"""The web, on loopback: the five HTTP search providers and the pages their hits point at.

One aiohttp app on 127.0.0.1, started and stopped from the calling process (own thread and event
loop). Each provider answers at its documented path (``PATHS``) in its documented request and
response format, and enforces its documented auth and parameter values (the tables of
``cm_ray/data/provider_values.yaml``): a bad value gets the provider's documented 4xx error body
and is counted per provider and reason. Hits name their culture and point at pages of the same app:
in the culture's language (CJK ones thousands of characters long), behind a 301 -> 302 redirect
chain, or behind a cookie consent interstitial.

    with WebStandIn() as web:  # accepts the API keys in KEYS; endpoints -> search.endpoints
        endpoints, counts = provider_urls(web.base), web.stats()
"""

from __future__ import annotations

import asyncio
import copy
import functools
import html
import re
import threading
import time
import uuid
from urllib.parse import quote

from cm_ray.data.provider_values import provider_values

KEYS = {"BRAVE_API_KEY": "rehearsal-brave-key", "SERPER_API_KEY": "rehearsal-serper-key",
        "TAVILY_API_KEY": "tvly-rehearsal-key", "YDC_API_KEY": "rehearsal-ydc-key"}
PATHS = {"searxng": "/searxng/search", "brave": "/brave/res/v1/web/search",
         "serper": "/serper/search", "tavily": "/tavily/search", "you": "/you/v1/search"}
# provider: (method, auth header, key variable, query field, count field, count range, default
# count, (HTTP status of an auth failure, of a bad parameter))
API = {"searxng": ("GET", None, None, "q", None, None, 10, (None, 400)),
       "brave": ("GET", "X-Subscription-Token", "BRAVE_API_KEY", "q", "count", (1, 20), 20, (401, 422)),
       "serper": ("POST", "X-API-KEY", "SERPER_API_KEY", "q", "num", (1, 100), 10, (403, 400)),
       "tavily": ("POST", "Authorization", "TAVILY_API_KEY", "query", "max_results", (0, 20), 5, (401, 400)),
       "you": ("GET", "X-API-Key", "YDC_API_KEY", "query", "count", (1, 100), 10, (401, 422))}


def provider_urls(base: str) -> dict[str, str]:
    """{provider: endpoint URL} of the stand-ins under ``base``, for ``search.endpoints``."""
    return {p: base.rstrip("/") + path for p, path in PATHS.items()}


class Rejected(Exception):
    def __init__(self, status: int, reason: str, param: str, message: str, value=None):
        super().__init__(message)
        self.status, self.reason, self.param, self.message, self.value = status, reason, param, message, value


def error_body(provider: str, e: Rejected) -> dict:
    """The error body ``provider`` documents for a refused request."""
    if provider == "brave":
        code = "SUBSCRIPTION_TOKEN_INVALID" if e.status == 401 else "VALIDATION"
        meta = {"errors": [{"type": "enum", "loc": ["query", e.param], "msg": e.message, "input": e.value}]}
        return {"type": "ErrorResponse", "time": int(time.time()),
                "error": {"id": str(uuid.uuid4()), "status": e.status, "code": code, "detail": e.message,
                          "meta": meta if e.status == 422 else {"component": "authentication"}}}
    if provider == "serper":
        return {"message": e.message, "statusCode": e.status}
    if provider == "tavily":
        return {"detail": {"error": e.message}}
    if provider == "you" and e.status == 422:
        return {"detail": [{"loc": ["query", e.param], "msg": e.message, "type": "enum", "input": e.value}]}
    return {"detail": e.message} if provider == "you" else {"error": e.message}


def _documented(provider: str, param: str) -> tuple[str, object] | None:
    """(field kind, allowed) for a country/language parameter of ``provider``."""
    for spec in provider_values()[provider].values():
        if spec["param"] == param:
            if "pattern" in spec:
                return "pattern", spec["pattern"]
            return "enum", set(spec["names"].values()) if "names" in spec else set(spec["values"])
    return None


def validate(provider: str, fields: dict, headers) -> tuple[str, int]:
    """(query, count) of a request that follows ``provider``'s documentation; Rejected otherwise."""
    method, header, key_env, qfield, cfield, crange, default, (auth, bad) = API[provider]
    if header:
        sent = headers.get(header, "")
        if (sent.removeprefix("Bearer ") if provider == "tavily" else sent) != KEYS[key_env] or (
                provider == "tavily" and not sent.startswith("Bearer ")):
            raise Rejected(auth, "auth", header, f"missing or invalid API key in {header}")
    if provider == "searxng" and fields.get("format") != "json":
        raise Rejected(bad, "bad format", "format", f"Invalid value {fields.get('format')!r} for parameter format")
    query = fields.get(qfield)
    if not isinstance(query, str) or not query.strip():
        raise Rejected(bad, f"missing {qfield}", qfield, f"{qfield} is required")
    for param, value in fields.items():
        rule = _documented(provider, param)
        if rule and not (re.fullmatch(rule[1], str(value)) if rule[0] == "pattern" else value in rule[1]):
            raise Rejected(bad, f"bad {param}", param, f"Invalid value {value!r} for parameter {param}", value)
    if provider == "tavily" and "country" in fields and fields.get("topic", "general") != "general":
        raise Rejected(bad, "bad topic", "topic", "country is available only if topic is general")
    count = fields.get(cfield, default) if cfield else default
    try:
        count = int(count)
    except (TypeError, ValueError):
        count = -1
    if crange and not crange[0] <= count <= crange[1]:
        raise Rejected(bad, f"bad {cfield}", cfield, f"{cfield} must be in {crange[0]}..{crange[1]}", fields.get(cfield))
    return query, count


def culture_of(provider: str, fields: dict, query: str) -> str | None:
    """The culture a request targets: its country (or locale region), else a country named in the
    query; None for a worldwide request (Brave's country=ALL with no country in the query)."""
    from cm_ray.cultures import registry

    reg = registry()
    value = {"searxng": str(fields.get("language", "")).rpartition("-")[2], "brave": fields.get("country"),
             "serper": fields.get("gl"), "you": fields.get("country"),
             "tavily": next((k for k, n in provider_values()["tavily"]["country"]["names"].items()
                             if n == fields.get("country")), None)}[provider]
    value = "GB" if str(value).lower() == "uk" else str(value).upper()
    if value in reg:
        return value
    text = query.lower()
    return next((k for k, c in reg.items() if len(c.name) > 3 and c.name.lower() in text), None)


TEXT = {
    "en": ["In {n}, people greet the eldest first and keep their voices low in public.",
           "Families in {n} often share a long meal at the weekend and talk about work, school and faith.",
           "Jokes about religion or regions can offend in {n}; politeness matters at work."],
    "zh": ["在{n}，人们见面时通常先问候长辈，在公共场合说话比较克制。", "{n}的家庭常在周末一起吃饭，谈论工作、学习和传统节日。",
           "在{n}，关于地域和宗教的玩笑可能冒犯别人，职场上很重视礼貌和分寸。"],
    "ja": ["{n}では、人に会うとまず目上の人にあいさつし、公共の場では静かに話します。",
           "{n}の家族は週末に一緒に食事をし、仕事や学校、季節の行事について話します。",
           "{n}では、地域や宗教についての冗談は人を傷つけることがあり、職場では礼儀が重んじられます。"],
    "ko": ["{n}에서는 사람을 만나면 먼저 어른께 인사하고 공공장소에서는 조용히 말합니다.",
           "{n}의 가족은 주말에 함께 식사하며 일과 학교, 명절에 대해 이야기합니다.",
           "{n}에서는 지역이나 종교에 관한 농담이 상처가 될 수 있고 직장에서는 예의를 중요하게 여깁니다."],
    "de": ["In {n} begrüßt man zuerst die Älteren und spricht in der Öffentlichkeit eher leise.",
           "Familien in {n} essen am Wochenende oft lange zusammen und sprechen über Arbeit und Schule.",
           "Witze über Religion oder Regionen können in {n} kränken; Höflichkeit zählt im Beruf."],
    "es": ["En {n} se saluda primero a los mayores y en público se habla en voz baja.",
           "Las familias de {n} suelen compartir una comida larga el fin de semana y hablan del trabajo.",
           "Las bromas sobre religión o regiones pueden ofender en {n}; la cortesía importa en el trabajo."],
    "hi": ["{n} में लोग पहले बड़ों का अभिवादन करते हैं और सार्वजनिक जगहों पर धीमे बोलते हैं।",
           "{n} में परिवार अक्सर सप्ताहांत पर साथ भोजन करते हैं और काम, पढ़ाई और त्योहारों की बातें करते हैं।",
           "{n} में धर्म या क्षेत्र पर मज़ाक किसी को ठेस पहुँचा सकता है; काम पर शिष्टाचार ज़रूरी है।"],
    "ar": ["في {n} يحيّي الناس كبار السن أولاً ويتحدثون بصوت منخفض في الأماكن العامة.",
           "تجتمع العائلات في {n} غالباً على وجبة طويلة في نهاية الأسبوع وتتحدث عن العمل والدراسة.",
           "قد تسيء النكات عن الدين أو المناطق إلى الناس في {n}، واللباقة مهمة في العمل."],
}
CJK = ("zh", "ja", "ko")


def page_text(culture: str | None, i: int) -> tuple[str, str, list[str]]:
    """(language, culture's name in it, paragraphs) of page ``i`` about ``culture``; CJK pages are
    several thousand characters long."""
    from babel import Locale

    from cm_ray.cultures import registry

    c = registry().get(culture or "")
    lang = next((x for x in (c.languages if c else ()) if x in TEXT), "en")
    name = (Locale.parse(lang).territories.get(c.key) or c.name) if c else "the world"
    sents = [s.format(n=name) for s in TEXT[lang]]
    n = 40 if lang in CJK else 3
    paras = [f"{k + 1}. " + "".join(sents[(k + j) % 3] for j in range(3)) + ("" if lang in CJK else f" ({i}.{k})")
             for k in range(n)]
    return lang, name, paras


class WebStandIn:
    """The providers and pages on 127.0.0.1:``port`` (0 = any free port); ``base`` once started.
    Providers in ``down`` answer every request with 503 (an outage, to rehearse fallbacks)."""

    def __init__(self, port: int = 0, down: tuple[str, ...] = ()):
        self.port, self.base, self._lock, self.down = port, None, threading.Lock(), set(down)
        self._stats = {"providers": {p: {"requests": 0, "ok": 0, "rejected": {}} for p in PATHS},
                       "pages": {"served": 0, "redirects": 0, "consent": 0, "cjk": 0}}

    def _count(self, *path: str) -> None:
        with self._lock:
            node = self._stats
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = node.get(path[-1], 0) + 1

    def stats(self) -> dict:
        """A copy of {"providers": {p: {requests, ok, rejected: {reason: n}}}, "pages": {served,
        redirects, consent, cjk}} (pages served, of them consent walls and CJK pages; redirects)."""
        with self._lock:
            return copy.deepcopy(self._stats)

    # ------------------------------------------------------------------------------ providers --
    async def _search(self, provider: str, request):
        from aiohttp import web

        self._count("providers", provider, "requests")
        try:
            if provider in self.down:
                raise Rejected(503, "down", "", "service unavailable")
            fields = dict(request.query)
            if API[provider][0] == "POST":
                body = await request.json() if request.can_read_body else {}
                fields = body if isinstance(body, dict) else {}
            query, count = validate(provider, fields, request.headers)
        except Rejected as e:
            self._count("providers", provider, "rejected", e.reason)
            return web.json_response(error_body(provider, e), status=e.status)
        except ValueError:  # a POST body that is not JSON
            self._count("providers", provider, "rejected", "invalid JSON")
            return web.json_response(error_body(provider, Rejected(400, "", "body", "invalid JSON")), status=400)
        self._count("providers", provider, "ok")
        return web.json_response(self._answer(provider, query, culture_of(provider, fields, query), count))

    def _hits(self, query: str, culture: str | None, count: int) -> list[tuple[str, str, str]]:
        lang, name, paras = page_text(culture, 0)
        key = culture or "ALL"
        kinds = ["pages", "moved", "walled"]
        out = []
        for i in range(1, count + 1):
            url = f"{self.base}/{kinds[(i - 1) % 3]}/{key}/{i}?q={quote(query)}"
            title = f"{name} ({key}) — {query} [{i}]"
            out.append((title, url, f"{name} ({key}): {paras[i % len(paras)][:160]}"))
        return out

    def _answer(self, provider: str, query: str, culture: str | None, count: int) -> dict:
        hits = self._hits(query, culture, count)
        if provider == "searxng":
            return {"query": query, "results": [{"title": t, "url": u, "content": s, "engine": "x"} for t, u, s in hits]}
        if provider == "brave":
            return {"type": "search", "query": {"original": query},
                    "web": {"type": "search", "results": [{"title": t, "url": u, "description": s} for t, u, s in hits]}}
        if provider == "serper":
            return {"searchParameters": {"q": query, "type": "search"},
                    "organic": [{"title": t, "link": u, "snippet": s, "position": i}
                                for i, (t, u, s) in enumerate(hits, 1)]}
        if provider == "tavily":
            return {"query": query, "answer": None, "images": [], "response_time": 0.01,
                    "results": [{"title": t, "url": u, "content": s, "score": round(1 - i / 100, 2)}
                                for i, (t, u, s) in enumerate(hits)]}
        return {"results": {"web": [{"url": u, "title": t, "description": s, "snippets": [s]} for t, u, s in hits],
                            "news": []},
                "metadata": {"request_uuid": str(uuid.uuid4()), "query": query, "latency": 0.01}}

    # ---------------------------------------------------------------------------------- pages --
    async def _page(self, request):
        from aiohttp import web

        kind, culture, i = request.match_info["kind"], request.match_info["culture"], request.match_info["i"]
        suffix = f"?{request.query_string}" if request.query_string else ""
        if kind in ("moved", "moved2", "walled"):
            self._count("pages", "redirects")
            target = {"moved": f"/moved2/{culture}/{i}{suffix}", "moved2": f"/pages/{culture}/{i}{suffix}",
                      "walled": f"/consent?continue={quote(f'/pages/{culture}/{i}')}"}[kind]
            raise (web.HTTPMovedPermanently if kind == "moved" else web.HTTPFound)(target)
        lang, name, paras = page_text(None if culture == "ALL" else culture, int(i) if i.isdigit() else 0)
        self._count("pages", "served")
        if lang in CJK:
            self._count("pages", "cjk")
        body = "".join(f"<p>{html.escape(p)}</p>" for p in paras)
        return web.Response(content_type="text/html", charset="utf-8", text=(
            f"<!doctype html><html lang='{lang}'><head><meta charset='utf-8'><title>{html.escape(name)}"
            f"</title></head><body><nav><a href='/'>Home</a></nav><article><h1>{html.escape(name)}</h1>"
            f"{body}</article><footer>© rehearsal</footer></body></html>"))

    async def _consent(self, request):
        from aiohttp import web

        self._count("pages", "consent"), self._count("pages", "served")
        target = html.escape(request.query.get("continue", "/"))
        return web.Response(content_type="text/html", charset="utf-8", text=(
            "<!doctype html><html><head><title>Before you continue</title></head><body>"
            "<div class='cookie-wall'><h1>We value your privacy</h1><p>We use cookies and similar "
            "technologies to run this site, measure audiences and personalise content. Choose "
            f"Accept all to continue.</p><form action='{target}'><button>Accept all</button></form>"
            f"<a href='{target}'>Reject all</a></div></body></html>"))

    # ------------------------------------------------------------------------------ lifecycle --
    def app(self):
        from aiohttp import web

        app = web.Application()
        for provider, path in PATHS.items():
            app.router.add_route(API[provider][0], path, functools.partial(self._search, provider))
        app.router.add_get("/consent", self._consent)
        app.router.add_get(r"/{kind:pages|moved|moved2|walled}/{culture}/{i}", self._page)
        return app

    def start(self) -> WebStandIn:
        from aiohttp import web

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="web-stand-in", daemon=True)
        self._thread.start()

        async def up():
            self._runner = web.AppRunner(self.app())
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            await site.start()
            return site._server.sockets[0].getsockname()[1]

        self.port = asyncio.run_coroutine_threadsafe(up(), self._loop).result(30)
        self.base = f"http://127.0.0.1:{self.port}"
        return self

    def stop(self) -> None:
        if self.base is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self.base = None

    def __enter__(self) -> WebStandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
