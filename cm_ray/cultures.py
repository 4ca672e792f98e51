"""Culture registry: one entry per ISO 3166-1 country, built from pycountry and Babel's CLDR data.

The culture key (ISO alpha-2, upper case, e.g. ``"MX"``) is the one ID used everywhere: dataset
column, Parquet partition, adapter directory, Tune trial and Serve multiplexed model id.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Culture:
    key: str
    """ISO 3166-1 alpha-2, upper case."""
    alpha3: str
    name: str
    languages: tuple[str, ...]
    """Official (or de-facto) languages, most used first, as ISO 639 codes."""
    locale: str
    """Search locale, BCP 47 (e.g. es-MX)."""

    @property
    def language(self) -> str:
        return self.languages[0]

    @property
    def language_name(self) -> str:
        from babel import Locale

        try:
            return Locale.parse(self.language).get_display_name("en") or self.language
        except Exception:
            return self.language


@lru_cache(maxsize=1)
def registry() -> dict[str, Culture]:
    """All cultures keyed by alpha-2 (~249 entries)."""
    import pycountry
    from babel.languages import get_official_languages

    out: dict[str, Culture] = {}
    for country in pycountry.countries:
        key = country.alpha_2.upper()
        langs = get_official_languages(key, de_facto=True) or ()
        # Babel returns locale ids such as "zh_Hant"; keep the language part, dedup, keep order.
        seen: list[str] = []
        for lang in langs:
            base = lang.split("_")[0]
            if base not in seen:
                seen.append(base)
        if not seen:
            seen = ["en"]
        name = getattr(country, "common_name", None) or country.name
        out[key] = Culture(key=key, alpha3=country.alpha_3.upper(), name=name,
                           languages=tuple(seen), locale=f"{seen[0]}-{key}")
    return out


@lru_cache(maxsize=1)
def _aliases() -> dict[str, str]:
    import pycountry

    table: dict[str, str] = {}
    for country in pycountry.countries:
        key = country.alpha_2.upper()
        for alias in (country.alpha_2, country.alpha_3, country.name,
                      getattr(country, "common_name", None), getattr(country, "official_name", None)):
            if alias:
                table[alias.lower()] = key
    # Common names in the public data sets that ISO spells differently.
    for alias, key in {"uk": "GB", "britain": "GB", "great britain": "GB", "england": "GB",
                       "usa": "US", "us": "US", "united states": "US", "america": "US",
                       "south korea": "KR", "korea": "KR", "iran": "IR", "russia": "RU",
                       "china": "CN", "vietnam": "VN", "taiwan": "TW"}.items():
        table[alias] = key
    return table


def normalize_culture(value: str) -> str:
    """Map an alpha-2/alpha-3 code or English country name to the culture key."""
    key = _aliases().get(str(value).strip().lower().replace("_", " "))
    if key is None:
        raise KeyError(f"unknown culture {value!r}: use an ISO 3166-1 code such as 'MX' or 'MEX'")
    return key


def get_culture(value: str) -> Culture:
    return registry()[normalize_culture(value)]


def is_culture_key(value: str) -> bool:
    """True for an exact registry key (what adapter dirs and multiplexed ids must be)."""
    return isinstance(value, str) and value in registry()
