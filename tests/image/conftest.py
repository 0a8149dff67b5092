"""The image tests run by `make test-image` only (it builds the image first): they
need podman and a few minutes, so `make test` collects nothing here."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("GOLEASH_TEST_IMAGE") == "1":
        return
    skip = pytest.mark.skip(reason="the image is tested by `make test-image`")
    for item in items:
        if "tests/image/" in str(item.fspath):
            item.add_marker(skip)
