"""Helpers for the scorer tests (tiny models on 8x8 images; everything runs in seconds)."""

from bdframe.testing import tiny_classifier, tiny_imageset


def make(n=40, k=4, size=8, seed=0, id_offset=100, width=8, constant=False):
    """``(data, model)``: n random images of k classes and a seeded tiny classifier."""
    data = tiny_imageset(n, num_classes=k, size=size, seed=seed, id_offset=id_offset)
    return data, tiny_classifier(data, seed=seed, width=width, constant=constant)
