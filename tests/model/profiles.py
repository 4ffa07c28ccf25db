"""The continuity model's hypothesis profiles (registered when conftest imports this).

- ``continuity-ci`` (the default for the model): derandomized, so every CI run plays
  the same examples, sized to finish in about two minutes on a loaded two-core machine.
- ``deep`` (``pytest tests/model --hypothesis-profile=deep``): random, many more and
  longer examples, for nightly runs; a failure is saved in hypothesis's example
  database and replayed first the next time.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

CI_PROFILE = "continuity-ci"
DEEP_PROFILE = "deep"
_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.filter_too_much,
                 HealthCheck.function_scoped_fixture]

settings.register_profile(
    CI_PROFILE, derandomize=True, database=None, max_examples=100, stateful_step_count=15,
    deadline=None, suppress_health_check=_SLOW_IS_FINE, print_blob=False,
)
settings.register_profile(
    DEEP_PROFILE, max_examples=300, stateful_step_count=80, deadline=None,
    suppress_health_check=_SLOW_IS_FINE, print_blob=True,
)


def model_settings() -> settings:
    """The deep profile when it is loaded, else the CI one (whatever else is loaded)."""
    if settings.get_current_profile_name() == DEEP_PROFILE:
        return settings()
    return settings.get_profile(CI_PROFILE)
