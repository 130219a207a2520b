"""Shared fixtures: the real default model, loaded once per test run."""

from __future__ import annotations

import pytest

from megacontext_memory import MegaContextEngine


@pytest.fixture(scope="session")
def engine_factory(tmp_path_factory):
    """Engines on fresh stores; they share the one loaded base model."""

    def make(store=None, **kwargs) -> MegaContextEngine:
        store = store or tmp_path_factory.mktemp("store")
        kwargs.setdefault("working_budget", 512)
        return MegaContextEngine(store=store, **kwargs)

    return make


@pytest.fixture(scope="session")
def base(engine_factory):
    return engine_factory().base
