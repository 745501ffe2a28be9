"""Shared fixtures: tiny local models and tokenizers (tests/tiny.py), and the shared example data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tiny import save_tiny, tiny_tokenizer

# tests/scale: replicated serving on a real (local) Ray Serve cluster, which `make test-scale` runs after installing
# lorakit[ray]; `make test` does not collect it (it needs Ray and takes minutes). Here, not in a conftest.py of its
# own: a second module named conftest would take the place of this one for `from conftest import ...`.
collect_ignore = [] if os.environ.get("LORAKIT_TEST_SCALE") else ["scale"]

# The example data sets live beside the repo (../shared/data), not inside it.
SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tok():
    """The ChatML tiny tokenizer; session-scoped, so copy it (tiny_tokenizer()) before mutating."""
    return tiny_tokenizer("chatml")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved tiny llama + ChatML tokenizer folder that from_pretrained loads offline."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), arch="llama", chat_template="chatml")


def shared_data_dir() -> Path:
    """../shared/data, or skip the calling test when this checkout has no shared data beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data is absent: expected the example data sets at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def shared_data() -> Path:
    """The shared example data folder (skips when absent)."""
    return shared_data_dir()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
