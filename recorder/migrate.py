"""Upgrading traces of older major versions, one major version at a time.

A reader meets wire dicts (header and records, as msgpack decoded them) of
major version ``n`` and runs them through ``MIGRATIONS[n]``, ``[n + 1]``, ...
until they have the current shape; only then are they validated. Minor
versions never need a step: they only add what older readers may ignore.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import attrs

from recorder.records import FORMAT_VERSION

__all__ = ["MIGRATIONS", "Migration", "Step", "steps_from"]

Step: TypeAlias = Callable[[dict[str, Any]], dict[str, Any]]


@attrs.frozen
class Migration:
    """How wire dicts of one major version become those of the next one.

    ``header`` must also set the header's ``version`` to the new one.
    """

    header: Step
    record: Step


#: ``MIGRATIONS[n]`` upgrades major version ``n`` to ``n + 1``. Empty while 1
#: is the only major version there has been.
MIGRATIONS: dict[int, Migration] = {}


def steps_from(major: int) -> list[Migration] | None:
    """The migrations from ``major`` up to the current major, or None if one is missing."""
    steps = []
    for version in range(major, FORMAT_VERSION[0]):
        step = MIGRATIONS.get(version)
        if step is None:
            return None
        steps.append(step)
    return steps
