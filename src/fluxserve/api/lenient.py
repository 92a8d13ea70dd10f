"""Lenient coercion as ModelsLab clients send values: numbers as numbers or numeric strings,
booleans as JSON booleans, "true"/"false"/"yes"/"no", 1/0. Empty strings mean "not given"."""

from __future__ import annotations

import math
from typing import Any

_TRUE = {"true", "yes", "1", "y", "on"}
_FALSE = {"false", "no", "0", "n", "off"}


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() in ("", "null", "None"))


def to_int(value: Any) -> int | None:
    if _blank(value):
        return None
    if isinstance(value, bool):
        raise ValueError("must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if value.is_integer():
            return int(value)
        raise ValueError("must be an integer")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            number = _float_or_none(text)
            if number is not None and number.is_integer():
                return int(number)
    raise ValueError("must be an integer")


def _float_or_none(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def to_float(value: Any) -> float | None:
    if _blank(value):
        return None
    if isinstance(value, bool):
        raise ValueError("must be a number")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return float(value)
    if isinstance(value, str):
        number = _float_or_none(value.strip())
        if number is not None:
            return number
    raise ValueError("must be a number")


def to_bool(value: Any) -> bool | None:
    if _blank(value):
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise ValueError("must be a boolean (true/false, yes/no, 1/0)")


_CONTROL = {chr(c) for c in range(32)} - {"\t", "\n", "\r"} | {chr(127)}


def clean_text(text: str) -> str:
    """Refuse what can't be stored or shown safely: C0 control characters (tab and newlines are
    fine) and lone surrogates (not encodable as UTF-8)."""
    if any(ch in _CONTROL for ch in text):
        raise ValueError("must not contain control characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return text


def to_text(value: Any) -> str | None:
    """Strings as-is (cleaned); numbers (e.g. a numeric track_id) as their text."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("must be a string")
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return clean_text(value)
    raise ValueError("must be a string")


def to_url_list(value: Any) -> list[str] | None:
    """One URL or an array of URLs; blanks dropped."""
    if _blank(value):
        return None
    items = value if isinstance(value, list) else [value]
    urls = []
    for item in items:
        if _blank(item):
            continue
        if not isinstance(item, str):
            raise ValueError("must be an image URL or an array of image URLs")
        urls.append(clean_text(item).strip())
    return urls or None
