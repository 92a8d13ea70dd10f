"""Lenient coercion of ModelsLab client values."""

from __future__ import annotations

import pytest

from fluxserve.api import lenient


@pytest.mark.parametrize("raw,expected", [(512, 512), ("512", 512), (" 512 ", 512), (512.0, 512), ("512.0", 512),
                                          (None, None), ("", None), ("null", None)])
def test_to_int(raw, expected):
    assert lenient.to_int(raw) == expected


@pytest.mark.parametrize("raw", [True, 1.5, "1.5", "abc", [1], {"a": 1}, "inf"])
def test_to_int_refuses(raw):
    with pytest.raises(ValueError):
        lenient.to_int(raw)


@pytest.mark.parametrize("raw,expected", [(0.5, 0.5), ("0.5", 0.5), (1, 1.0), ("2.5", 2.5), (None, None)])
def test_to_float(raw, expected):
    assert lenient.to_float(raw) == expected


@pytest.mark.parametrize("raw", [True, "nan", "inf", float("nan"), "x", [0.5]])
def test_to_float_refuses(raw):
    with pytest.raises(ValueError):
        lenient.to_float(raw)


@pytest.mark.parametrize("raw,expected", [(True, True), ("true", True), ("Yes", True), (1, True), ("1", True),
                                          (False, False), ("false", False), ("no", False), (0, False), ("0", False),
                                          (None, None), ("", None)])
def test_to_bool(raw, expected):
    assert lenient.to_bool(raw) is expected


@pytest.mark.parametrize("raw", ["maybe", 2, [True]])
def test_to_bool_refuses(raw):
    with pytest.raises(ValueError):
        lenient.to_bool(raw)


def test_to_url_list():
    assert lenient.to_url_list("http://a/x.png") == ["http://a/x.png"]
    assert lenient.to_url_list(["http://a/x.png", "", None, " http://b/y.png "]) == ["http://a/x.png", "http://b/y.png"]
    assert lenient.to_url_list([]) is None and lenient.to_url_list(None) is None
    with pytest.raises(ValueError):
        lenient.to_url_list([1])
