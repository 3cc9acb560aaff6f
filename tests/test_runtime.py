"""Data tests: the Ray Data plumbing shared by the image jobs (capray.runtime), on local Ray."""

from __future__ import annotations

from capray.runtime import uri_dataset


def test_the_model_stage_gets_full_batches(ray_local) -> None:
    # 498 URIs once reached the model as alternating batches of 16 and 2 (Ray Data's default
    # blocks of from_items); every batch but the last must be full.
    ds = uri_dataset([f"img{i:03d}.jpg" for i in range(498)], 16)
    sizes = ds.map_batches(lambda b: {"n": [len(b["image"])]}, batch_size=16).to_pandas()["n"].tolist()
    assert sorted(sizes, reverse=True) == [16] * 31 + [2]
