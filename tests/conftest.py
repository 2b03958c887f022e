"""Hypothesis profiles: `dev` (default, quick), `ci` (what ./run test uses), `deep` (long runs).

Choose one with HYPOTHESIS_PROFILE=ci|deep|dev.
"""

from __future__ import annotations

import os
import sys

from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow,
                                                        HealthCheck.data_too_large]}
settings.register_profile("dev", max_examples=100, stateful_step_count=30, **_COMMON)
settings.register_profile("ci", max_examples=2000, stateful_step_count=30, print_blob=True,
                          **_COMMON)
settings.register_profile("deep", max_examples=20000, stateful_step_count=80, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

sys.path.insert(0, os.path.dirname(__file__))  # tests/faulty.py: the re-created field bugs

from s3server import s3_server, target  # noqa: E402, F401  (fixtures: a real S3 service)
