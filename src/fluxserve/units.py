"""Sizes written in settings text (``FLUXSERVE_GPU_MEMORY_BUDGET``). Torch-free: the settings
check them when ``serve`` starts; the engine (``engine.residency``) uses the same parser."""

from __future__ import annotations

import re

__all__ = ["parse_bytes"]


def parse_bytes(text: str | int | None) -> int | None:
    """``"20GiB"``, ``"512MB"``, ``"1.5G"``, ``"123456"`` -> bytes; ``None``/``""``/``"auto"`` -> None.
    Units: B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB (binary multiples for all: memory sizes)."""
    if text is None or isinstance(text, int):
        return text
    cleaned = text.strip().replace("_", "")
    if cleaned.lower() in ("", "auto", "none"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", cleaned, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (expected e.g. 20GiB, 512MB or a number of bytes)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))
