"""Sizes of the tiny parts (conftest.py builds them); test dirs are not packages, so tests import this module."""

TEXT_HIDDEN, VISION_HIDDEN, IMAGE, PATCH = 48, 32, 28, 14  # 4 patches -> 4 image tokens
