"""Evidence the culture router combines, none of which needs training rows for a culture:

- ``language``: P(language | text) from py3langid (a naive-Bayes language-ID model shipped inside
  its wheel, 97 languages, loaded offline) folded with each culture's CLDR territory -> language
  population shares (Babel's ``territory_languages``): L(c) = sum_l P(l | text) * share(l | c).
- ``mention``: the text names the country (its CLDR name in English and in the languages of the
  router's cultures, or a common alias such as "UK").
- ``variety``: the text uses words of one country's variety of its language (``varieties.yaml``:
  vosotros forms and "gilipollas" for Spain, "wey" and "pinche" for Mexico): what separates
  cultures that share a language, where language ID and the CLDR shares cannot.

All three are log-scores per culture, added to the content classifier's (``router.model``) before the
calibration temperature. Every lookup is cached per text.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

FLOOR = 1e-4
"""Probability floor of a language a culture's CLDR entry does not list (speakers exist anywhere)."""
MENTION_LOG_WEIGHT = 3.0
"""Log-score added to a culture whose country the text names (a factor of e^3 ~ 20)."""
VARIETY_LOG_WEIGHT = 2.0
"""Log-score added, times P(language | text), to a culture whose variety of that language the
text's words mark (a factor of e^2 ~ 7: more than the CLDR shares separate, less than a mention)."""
CONTENT_FLOOR = 0.05
"""The content head's probabilities are floored here: content evidence moves a culture by at most
log(K) up and log(1 / (0.05 K)) down, so the encoder is skipped when that cannot change the pick."""
_ALIASES = {"US": ["USA", "U.S.", "US"], "GB": ["UK", "U.K.", "Britain", "England"],
            "KR": ["Korea"], "RU": ["Russia"], "IR": ["Iran"], "CN": ["China"]}
_SAME_LANGUAGE = {"wuu": "zh", "yue": "zh", "nn": "no", "ary": "ar", "arz": "ar", "uzs": "uz"}


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


@lru_cache(maxsize=65536)
def language_probs(text: str, top: int = 5) -> tuple[tuple[str, float], ...]:
    """The ``top`` most probable languages of ``text`` (ISO 639 codes), probabilities normalised;
    none for a text with fewer than 3 letters (digits, emoji: no language evidence)."""
    if sum(ch.isalpha() for ch in text or "") < 3:
        return ()
    ranked = _identifier().rank(text or "")[:top]
    merged: dict[str, float] = {}
    for lang, p in ranked:
        lang = _SAME_LANGUAGE.get(lang, lang)
        merged[lang] = merged.get(lang, 0.0) + float(p)
    total = sum(merged.values()) or 1.0
    return tuple((k, v / total) for k, v in merged.items())


@lru_cache(maxsize=512)
def language_shares(culture: str) -> dict[str, float]:
    """CLDR population share of each language in ``culture``'s territory (sums to 1)."""
    from babel.core import get_global

    from cm_ray.cultures import get_culture

    entry = get_global("territory_languages").get(culture, {})
    shares: dict[str, float] = {}
    for lang, info in entry.items():
        base = lang.split("_")[0]
        shares[base] = shares.get(base, 0.0) + float(info.get("population_percent") or 0.0)
    if not shares or sum(shares.values()) <= 0:
        shares = {get_culture(culture).language: 1.0}
    total = sum(shares.values())
    return {k: v / total for k, v in shares.items()}


def language_scores(texts: list[str], cultures: list[str]) -> np.ndarray:
    """log L(c | text), shape (len(texts), len(cultures))."""
    shares = [language_shares(c) for c in cultures]
    out = np.ones((len(texts), len(cultures)), np.float64)
    for i, t in enumerate(texts):
        if not (probs := language_probs(t)):
            continue
        for j, s in enumerate(shares):
            out[i, j] = sum(p * s.get(lang, FLOOR) for lang, p in probs)
    return np.log(np.maximum(out, 1e-12))


@lru_cache(maxsize=64)
def _mention_patterns(cultures: tuple[str, ...]) -> list[tuple[re.Pattern, re.Pattern | None]]:
    """Per culture: (case-insensitive names pattern, case-sensitive abbreviations pattern)."""
    from babel import Locale

    from cm_ray.cultures import get_culture

    langs = {"en", *(lang for c in cultures for lang in get_culture(c).languages)}
    out = []
    for c in cultures:
        names = {get_culture(c).name}
        for lang in langs:
            try:
                names.add(Locale.parse(lang).territories.get(c) or "")
            except Exception:  # a language CLDR has no locale for
                continue
        abbrev = [a for a in _ALIASES.get(c, []) if a.isupper() or "." in a]
        names |= {a for a in _ALIASES.get(c, []) if a not in abbrev}
        names = sorted((n for n in names if len(n) >= 3), key=len, reverse=True)
        # Latin-script names on word boundaries; other scripts as substrings (no spaces in zh,
        # prepositions glued on in fa).
        alts = [rf"\b{re.escape(n)}\b" if n.isascii() else re.escape(n) for n in names]
        ab = re.compile("|".join(rf"(?<![\w.]){re.escape(a)}(?![\w])" for a in abbrev)) if abbrev else None
        out.append((re.compile("|".join(alts), re.IGNORECASE), ab))
    return out


def mention_scores(texts: list[str], cultures: list[str]) -> np.ndarray:
    """MENTION_LOG_WEIGHT where a text names a culture's country, else 0."""
    pats = _mention_patterns(tuple(cultures))
    out = np.zeros((len(texts), len(cultures)), np.float64)
    for i, t in enumerate(texts):
        for j, (names, ab) in enumerate(pats):
            if names.search(t) or (ab is not None and ab.search(t)):
                out[i, j] = MENTION_LOG_WEIGHT
    return out


@lru_cache(maxsize=1)
def _variety_lexicon() -> dict[str, dict[str, re.Pattern]]:
    """language -> culture -> one case-insensitive whole-word pattern of its markers."""
    from importlib.resources import files

    import yaml

    raw = yaml.safe_load(files("cm_ray.router").joinpath("varieties.yaml").read_text(encoding="utf-8"))
    out: dict[str, dict[str, re.Pattern]] = {}
    for lang, by_culture in raw.items():
        out[lang] = {}
        for culture, words in by_culture.items():
            alts = [w[3:] if w.startswith("re:") else re.escape(w) for w in words]
            out[lang][culture] = re.compile(rf"(?<!\w)(?:{'|'.join(alts)})(?!\w)", re.IGNORECASE)
    return out


def variety_scores(texts: list[str], cultures: list[str]) -> np.ndarray:
    """VARIETY_LOG_WEIGHT x P(language | text) for each culture whose variety markers of that
    language the text uses, else 0."""
    lexicon, col = _variety_lexicon(), {c: j for j, c in enumerate(cultures)}
    out = np.zeros((len(texts), len(cultures)), np.float64)
    for i, t in enumerate(texts):
        for lang, p in language_probs(t):
            for c, pat in lexicon.get(lang, {}).items():  # the few listed countries, not every culture
                if c in col and pat.search(t):
                    out[i, col[c]] += VARIETY_LOG_WEIGHT * p
    return out


def declared_language_scores(language: str | None, cultures: list[str]) -> np.ndarray:
    """log share(language | culture) for a declared language (``es``, ``es-MX``); 0 without one."""
    lang = str(language or "").split("-")[0].split("_")[0].lower()
    if not lang:
        return np.zeros(len(cultures))
    return np.log(np.array([max(language_shares(c).get(lang, 0.0), FLOOR) for c in cultures]))


def content_applies(pre: np.ndarray, cols: list[int]) -> np.ndarray:
    """Per row of scores ``pre``: True when the content term (``cols`` get one, within its
    bounds) can change the top culture AND every culture it could put on top has rows.

    The head was trained only on the cultures with rows, so between one of them and a culture
    without rows (Spain vs Mexico for a Spanish text, with rows for Mexico alone) it can only
    favour the one it knows: there the other evidence decides, and the encoder need not run.
    """
    import math

    lo, hi = np.zeros(pre.shape[1]), np.zeros(pre.shape[1])
    lo[cols], hi[cols] = math.log(CONTENT_FLOOR * len(cols)), math.log(len(cols))
    rows = np.arange(len(pre))
    top = pre.argmax(axis=1)
    reach = pre + hi[None, :] > (pre[rows, top] + lo[top])[:, None]  # could overtake the top
    reach[rows, top] = True
    known = np.zeros(pre.shape[1], bool)
    known[cols] = True
    return (reach.sum(axis=1) > 1) & ~(reach & ~known[None, :]).any(axis=1)
