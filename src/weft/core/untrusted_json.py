"""JSON from outside weft's trust (store records, the config held in the store): decoded
with bounds, and every way it can fail is one `UntrustedJson` error (a ValueError).

Why not plain `json.loads`: its C decoder recurses once per nesting level, so an array
nested ~1,000 deep (2 KB, valid JSON) raises RecursionError, and one nested just under
that decodes but makes every later recursive walk (a check, `json.dumps`) raise it
instead. A digit string over 4,300 digits raises a plain ValueError; duplicate keys decode
silently to the last one (two readers may disagree on what a record says); NaN and
Infinity are not JSON. So the depth is measured before decoding (bounded tightly:
weft's records are a few levels deep), duplicates and non-finite numbers are refused,
and whatever the decoder raises anyway comes out as UntrustedJson. Pure: no I/O.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Final

# Lease records are 2 levels deep, configs 3; anything far deeper is not weft's.
MAX_DEPTH: Final = 32

# A JSON string (escapes included); its brackets are text, not structure.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class UntrustedJson(ValueError):
    """The text is not JSON weft reads: why, in one line."""


def depth_over(text: str, limit: int = MAX_DEPTH) -> int | None:
    """How deeply the arrays and objects in `text` nest, if deeper than `limit`; else
    None (brackets inside strings don't count). Cheap for ordinary records: a text with
    no more openers than `limit` cannot nest deeper and is not scanned."""
    if text.count("[") + text.count("{") <= limit:
        return None
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest if deepest > limit else None


def _text(value: str | bytes) -> str:
    if isinstance(value, str):
        return value
    # As json.loads does with bytes: UTF-8, -16 or -32, told apart by the first bytes.
    return bytes(value).decode(json.detect_encoding(value), "surrogatepass")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # in C: a Python loop per object cost a listing of 5,000 leases 40 ms
    if len(out) == len(pairs):
        return out
    seen: set[str] = set()  # the rare case: find the key to name it
    for key, _ in pairs:
        if key in seen:
            raise UntrustedJson(f"key {key[:100]!r} appears twice in one object")
        seen.add(key)
    return out


def _finite(literal: str) -> float:
    number = float(literal)
    if not math.isfinite(number):
        raise UntrustedJson(f"number {literal[:40]}... is out of range")
    return number


def _constant(name: str) -> Any:
    raise UntrustedJson(f"{name} is not a JSON number")


# One decoder for every record (json.loads builds a new one per call when given hooks).
_DECODER = json.JSONDecoder(object_pairs_hook=_unique, parse_float=_finite,
                            parse_constant=_constant)


def loads(value: str | bytes) -> Any:
    """Decode `value`, or raise UntrustedJson saying why not (never anything else)."""
    try:
        text = _text(value)
        depth = depth_over(text)
        if depth is not None:
            raise UntrustedJson(f"nested {depth} levels deep; at most {MAX_DEPTH} are read")
        if text.startswith("\ufeff"):
            raise UntrustedJson("Unexpected UTF-8 BOM (decode using utf-8-sig)")
        return _DECODER.decode(text)
    except UntrustedJson:
        raise
    except json.JSONDecodeError as exc:
        raise UntrustedJson(str(exc)) from None
    except (ValueError, UnicodeError, RecursionError, MemoryError) as exc:
        # A number of too many digits, undecodable bytes, or a bound the scan missed.
        raise UntrustedJson(f"not JSON weft reads: {type(exc).__name__}: "
                            f"{str(exc)[:200]}") from None
