"""Hypothesis profiles: `dev` (default, quick), `ci` (what ./run test uses), `deep` (long runs).

Choose one with HYPOTHESIS_PROFILE=ci|deep|dev.
"""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow,
                                                        HealthCheck.data_too_large]}
settings.register_profile("dev", max_examples=100, stateful_step_count=30, **_COMMON)
settings.register_profile("ci", max_examples=2000, stateful_step_count=30, print_blob=True,
                          **_COMMON)
settings.register_profile("deep", max_examples=20000, stateful_step_count=80, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

sys.path.insert(0, os.path.dirname(__file__))  # tests/faulty.py: the re-created field bugs

from s3server import (  # noqa: E402
    TEST_PASSWORD,
    own_server,  # noqa: F401
    parametrize_targets,
    s3_server,  # noqa: F401  (fixtures: a real S3 service)
    target,  # noqa: F401
)

# Every `blocktrail` a test runs (in this process or a child) opens encrypted repositories with
# the tests' password, and creates key files with argon2id at its cheapest.
os.environ.setdefault("BLOCKTRAIL_PASSWORD", TEST_PASSWORD)
os.environ.setdefault("BLOCKTRAIL_KDF", "t=1,m=1024,p=1")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_targets(metafunc)
