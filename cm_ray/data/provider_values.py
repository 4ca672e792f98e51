"""Each HTTP search provider's documented country/language values (``provider_values.yaml``),
and which of them a provider gets for a culture.

``targeting(provider, culture, locale)`` picks the culture's country and (the query's language
first, then the culture's languages) a language from the provider's documented values only, and
says how well that serves the culture: "exact"; "approximate" (Brave's catch-all ``country=ALL``,
a country or language left out, a second language); "unsupported" (neither the culture's country
nor any of its languages can be sent: the results would not be the culture's). Light: no network,
only yaml and the culture registry; ``cm_ray.rehearsal.web`` enforces the same tables.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources
from typing import NamedTuple


@lru_cache(maxsize=1)
def provider_values() -> dict:
    """Each HTTP provider's documented parameter values (``provider_values.yaml``)."""
    import yaml

    return yaml.safe_load(resources.files("cm_ray.data").joinpath("provider_values.yaml").read_text("utf-8"))


class Targeting(NamedTuple):
    params: dict
    """The country/language parameters to send (documented values only)."""
    support: str
    """"exact", "approximate" or "unsupported"."""
    reason: str
    """Why it is not exact ('' when it is)."""


def _cased(spec: dict, value: str) -> str:
    return {"upper": value.upper(), "lower": value.lower()}.get(spec.get("case"), value)


def _country(spec: dict, key: str) -> str | None:
    if "names" in spec:
        return spec["names"].get(key)
    value = _cased(spec, spec.get("aliases", {}).get(key, key))
    return value if value in spec["values"] else None


def _language(spec: dict, lang: str, key: str) -> str | None:
    regional = spec.get("regional", {}).get(lang)
    value = _cased(spec, regional.get(key, regional["*"]) if regional else spec.get("aliases", {}).get(lang, lang))
    return value if value in spec["values"] else None


@lru_cache(maxsize=4096)
def targeting(provider: str, culture: str, locale: str | None = None) -> Targeting:
    """The documented country/language values ``provider`` gets for ``culture`` (the query's
    ``locale`` language first, then the culture's languages), and how well that serves it."""
    from cm_ray.cultures import registry

    key = culture.upper()
    c = registry().get(key)
    name = c.name if c else key
    langs = list(dict.fromkeys([*([locale.split("-")[0].lower()] if locale else []), *(c.languages if c else ())]))
    spec, params, why = provider_values()[provider], {}, []
    lspec, cspec = spec.get("language"), spec.get("country")
    if "pattern" in (lspec or {}):  # SearXNG: the locale itself
        loc = locale or (c.locale if c else "")
        if re.fullmatch(lspec["pattern"], loc):
            return Targeting({lspec["param"]: loc}, "exact", "")
        return Targeting({}, "unsupported", f"{provider}: locale {loc!r} is not a {lspec['param']} value it accepts")
    country = _country(cspec, key) if cspec else None
    if country:
        params[cspec["param"]] = country
    elif cspec:
        fallback = cspec.get("fallback")
        params.update({cspec["param"]: fallback} if fallback else {})
        why.append(f"no {cspec['param']} value for {key} ({name}): "
                   + (f"sends {cspec['param']}={fallback} (results from every country)" if fallback
                      else f"{cspec['param']} left out (results not limited to {name})"))
    language = next(((lang, v) for lang in langs if (v := _language(lspec, lang, key))), None) if lspec else None
    if language:
        params[lspec["param"]] = language[1]
        if langs and language[0] != langs[0]:
            why.append(f"no {lspec['param']} value for {langs[0]!r}: sends {lspec['param']}={language[1]} "
                       f"(the culture's language {language[0]!r})")
    elif lspec:
        why.append(f"no {lspec['param']} value for any of {key}'s languages {langs}: {lspec['param']} left out")
    if not country and not language:
        return Targeting(params, "unsupported", f"{provider} cannot target {key} ({name}): " + "; ".join(why)
                         if why else f"{provider} has no country or language parameter for {key}")
    return Targeting(params, "approximate" if why else "exact", f"{provider}: " + "; ".join(why) if why else "")
