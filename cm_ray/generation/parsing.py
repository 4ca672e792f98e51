"""Reading what the models write: the one JSON extractor every stage and recipe uses.

Small models wrap JSON in chatter and code fences, or write two objects; guided decoding writes
pure JSON. ``extract_json`` finds the first JSON object or array either way and raises
``ValueError`` when there is none, so each caller counts its own drop reason for it.
"""

from __future__ import annotations

import json
import re
from typing import Any

_DECODER = json.JSONDecoder()
_OPEN = re.compile(r"[\[{]")


def extract_json(text: str | None, *, any_value: bool = False) -> Any:
    """The first JSON object or array in ``text`` (code fences and chatter around it ignored).

    Args:
        text: generated text (None reads as empty).
        any_value: a reply that is, as a whole, one JSON value of any type (a number, a string,
            ``null``) is returned as it is; otherwise only objects and arrays count.

    Raises:
        ValueError: no JSON value in the text.
    """
    text = text or ""
    if any_value:
        try:
            return json.loads(text.strip())
        except ValueError:
            pass
    for m in _OPEN.finditer(text):
        try:
            value, _ = _DECODER.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        return value
    raise ValueError("no JSON value in the output")
