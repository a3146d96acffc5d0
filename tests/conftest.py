"""Shared fixtures: every optimizer test runs on every host backend."""

from __future__ import annotations

import importlib.util

import pytest

HOST_BACKENDS = ["reference", "llvm"]


def _llvm_available() -> str | None:
    """None when the LLVM backend can be tried, else why its tests are skipped.

    Only a missing module skips: once `stepjit.runtime.cpu` exists, any failure to import or use
    it fails the tests.
    """
    if importlib.util.find_spec("llvmlite") is None:
        return "llvmlite is not installed"
    if importlib.util.find_spec("stepjit.runtime.cpu") is None:
        return "LLVM backend not available: stepjit.runtime.cpu does not exist yet"
    return None


@pytest.fixture(params=HOST_BACKENDS)
def backend(request) -> str:
    """The name of a host backend; each test using it runs once per backend."""
    if request.param == "llvm" and (reason := _llvm_available()):
        pytest.skip(reason)
    return request.param


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Compiled kernels go to a cache directory private to the test session."""
    monkeypatch.setenv("STEPJIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kernel-cache"))
