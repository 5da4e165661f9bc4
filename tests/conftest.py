"""Shared pytest setup: make the repo importable, and skip GPU tests without a GPU."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):  # the marker, not any test whose id says "cuda"
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def token_cache(tmp_path_factory):
    """Every test shares one fresh token cache, never the user's."""
    folder = tmp_path_factory.mktemp("token_cache")
    os.environ["MINIPRETRAIN_CACHE"] = str(folder)
    return folder
