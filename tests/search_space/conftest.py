"""Fixtures of the template tests."""
from __future__ import annotations

import pytest

from measure import LocalBuilder, LocalRunner


@pytest.fixture(scope="module")
def machinery(fast_policy):
    """A builder and a runner for one test module's candidates (verified, timed fast)."""
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(policy=fast_policy, timeout_s=60) as runner:
        yield builder, runner
