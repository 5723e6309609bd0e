"""
zcontrol's tests (trial). Importing this package registers the deterministic hypothesis
profile, as Twisted's own test suite does.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "zcontrol",
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=100,
    database=None,
)
settings.load_profile("zcontrol")
