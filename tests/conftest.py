"""Shared pytest fixtures: Go toolchains and built fixture binaries."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gobuild  # noqa: E402


@pytest.fixture(params=gobuild.TOOLCHAINS, ids=lambda v: f"go{v}")
def toolchain(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=list(gobuild.VARIANTS), ids=str)
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root for BPF (run `sudo make test`)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
