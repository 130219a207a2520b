"""Shared fixtures: the real default model, loaded once per test run."""

from __future__ import annotations

import pytest

from megacontext_memory import MegaContextEngine


@pytest.fixture(scope="session")
def engine_factory(tmp_path_factory):
    """Engines on fresh stores; they share the one loaded base model.

    In float32 unless a test asks for another dtype: "auto" picks bfloat16 on CPUs that
    compute it natively, and the tests compare the engine with fresh computations at
    float32's tolerances, the same on every CPU. Tests of the half-precision path ask for
    bfloat16; the end-to-end tests (serving, adapters, cookbook) run "auto"."""

    def make(store=None, **kwargs) -> MegaContextEngine:
        store = store or tmp_path_factory.mktemp("store")
        kwargs.setdefault("working_budget", 512)
        kwargs.setdefault("model_dtype", "float32")
        return MegaContextEngine(store=store, **kwargs)

    return make


@pytest.fixture(scope="session")
def base(engine_factory):
    return engine_factory().base
