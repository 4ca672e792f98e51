"""YAML from users (run configs, overrides, cluster files, task specs), loaded with limits.

``yaml.safe_load`` builds no objects but still expands aliases: a few lines of nested aliases
("billion laughs") describe 10^9 nodes, which whatever walks the result (validation, hashing,
dumping) then visits one by one. Here a document is refused when its text exceeds ``MAX_BYTES``,
when it uses more than ``MAX_ALIASES`` aliases, when its aliases would expand it past
``MAX_NODES`` nodes, or when an anchor contains itself. Every error is a ``YAMLInputError`` (a
``ValueError``) whose message starts with the file it is about.

Pure Python (PyYAML only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MAX_BYTES = 1 << 20
"""The largest YAML text accepted (1 MiB; the largest shipped config is a few KiB)."""
MAX_ALIASES = 100
"""The most aliases (``*name``) one document may use."""
MAX_NODES = 100_000
"""The most nodes a document may describe once its aliases are expanded."""


class YAMLInputError(ValueError):
    """A YAML file or string that cannot be read or is refused; the message names it."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """Nodes under ``node`` with every alias expanded (memoised per node: linear in the text)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise YAMLInputError("an anchor contains itself (a recursive alias)")
    open_.add(key)
    n = 1
    if isinstance(node, yaml.SequenceNode):
        n += sum(_expanded_size(c, sizes, open_) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n += sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_) for k, v in node.value)
    open_.discard(key)
    sizes[key] = n
    return n


def loads(text: str, source: str = "<string>") -> Any:
    """The one YAML document in ``text`` as plain data, within the limits above."""
    if len(text.encode("utf-8", "replace")) > MAX_BYTES:
        raise YAMLInputError(f"{source}: larger than {MAX_BYTES} bytes")
    loader = yaml.SafeLoader(text)
    try:
        if "*" in text and sum(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, yaml.SafeLoader)) > MAX_ALIASES:
            raise YAMLInputError(f"more than {MAX_ALIASES} aliases")
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {}, set())
        if size > MAX_NODES:
            raise YAMLInputError(f"{source}: aliases expand it to {size} nodes (at most {MAX_NODES})")
        return loader.construct_document(node)
    except YAMLInputError as e:
        raise YAMLInputError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None
    except yaml.MarkedYAMLError as e:
        at = f"line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}: " if e.problem_mark else ""
        raise YAMLInputError(f"{source}: not valid YAML: {at}{e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise YAMLInputError(f"{source}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise YAMLInputError(f"{source}: nested too deeply") from None
    finally:
        loader.dispose()


def read_text(path: str | Path) -> str:
    """A user's text file as UTF-8; every way it cannot be read is a ``YAMLInputError`` naming it."""
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            raise YAMLInputError(f"{path}: is a directory, not a file")
        if p.stat().st_size > MAX_BYTES:
            raise YAMLInputError(f"{path}: larger than {MAX_BYTES} bytes")
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise YAMLInputError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") from None
    except FileNotFoundError:
        raise YAMLInputError(f"{path}: no such file") from None
    except OSError as e:
        raise YAMLInputError(f"{path}: cannot be read: {e.strerror or e}") from None


def load(path: str | Path) -> Any:
    """The YAML file at ``path`` as plain data (``read_text`` + ``loads``)."""
    return loads(read_text(path), str(path))
