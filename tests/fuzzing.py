"""How many examples a property test runs: the count it names, times the profile's scale.

The hypothesis profiles are registered in ``tests/conftest.py``. Each carries its scale in
its own ``max_examples``: the scale is that over Hypothesis's default (100). "ci" and
"dev" keep the default, so a test runs exactly the count it names; "fuzz" has
``100 * $QCLUSTER_FUZZ_SCALE`` (20 unless set). A test that fixes its count with
``@settings(max_examples=N)`` does not scale; one that asks :func:`max_examples` does.
"""

from __future__ import annotations

from hypothesis import settings


def example_scale() -> float:
    """The active profile's ``max_examples`` over Hypothesis's default profile's."""
    active = settings.get_profile(settings.get_current_profile_name())
    return active.max_examples / settings.get_profile("default").max_examples


def max_examples(count: int) -> int:
    """``count`` examples scaled for the active profile: ``count`` itself under "ci" and
    "dev", at least 1."""
    return max(1, round(count * example_scale()))
