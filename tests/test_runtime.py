"""How capray's jobs set up Ray (capray.runtime), seen on the session's local Ray."""

from __future__ import annotations

import collections
from pathlib import Path

import ray

from capray.featurestore import read_features


def _actors_by_class() -> collections.Counter[str]:
    # Ray's public state API (ray.util.state) asks the dashboard, which the session's Ray runs
    # without; the GCS's actor table, dead actors included, is what it reads.
    return collections.Counter(a["ActorClassName"] for a in ray._private.state.actors().values())


def test_a_read_of_the_features_starts_two_footer_readers_not_ray_s_32(ray_local, synthetic_features: Path) -> None:
    # Ray Data's Parquet reader starts a pool of footer-reading actors for every read, 32 by
    # default: 32 worker processes each time a training dataset is read again.
    before = _actors_by_class()["FooterReader"]
    assert read_features(str(synthetic_features / "features")).count() > 0
    assert _actors_by_class()["FooterReader"] - before == 2
