"""Shared pytest set-up: keep JAX on the CPU and quiet, tests small."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest


@contextlib.contextmanager
def no_memoised_steps() -> Iterator[None]:
    """Step functions memoised by earlier tests are hidden for the duration.

    `StepFunctions.for_builder` memoises per process, and pytest-xdist runs many test files
    in one process in an order that changes from run to run; a test that asserts a compile
    happened (`compile_s > 0`) would otherwise pass or fail with whichever file ran the same
    spec first. The earlier memo is restored afterwards, so other tests keep their reuse.
    """
    from covidnet_jax import steps

    saved = steps._STEP_CACHE.copy()
    steps._STEP_CACHE.clear()
    try:
        yield
    finally:
        steps._STEP_CACHE.clear()
        steps._STEP_CACHE.update(saved)


@pytest.fixture
def fresh_step_functions() -> Iterator[None]:
    """`no_memoised_steps` for one test."""
    with no_memoised_steps():
        yield
