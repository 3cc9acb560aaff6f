"""Security: credentials never written anywhere; no unpickling of stored data; pixel bombs refused
from their header."""

from __future__ import annotations

import ast
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bucket_objects(s3, bucket: str) -> dict[str, bytes]:
    client = s3.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def test_credentials_never_appear_in_logs_configs_checkpoints_or_parquet(jobs_on_s3) -> None:
    """Every job against S3 with a distinctive secret in the config and another in the environment
    (tests/system/conftest.py); then every byte written (console, Ray's session logs, local files,
    bucket objects) is searched."""
    run = jobs_on_s3
    assert b"secret_access_key: ''" in run.console  # the --print-config at the end
    written = {"console": run.console}
    for path in run.root.rglob("*"):
        if path.is_file() and not path.is_socket():
            written[str(path)] = path.read_bytes()
    objects = _bucket_objects(run.s3, run.bucket.removeprefix("s3://"))
    written.update({f"{run.bucket}/{k}": v for k, v in objects.items()})
    # What must be there was searched: Ray's logs, checkpoints, saved configs and Parquet outputs.
    names = "\n".join(written)
    for expected in (
        "/logs/",
        "best/model.weights.h5",
        "best/optimizer.npz",
        "best/config.yaml",
        "features/_capray_config.yaml",
        "captions/_capray_config.yaml",
        "captions/list-",
        "features/list-",
        "features/_shards.parquet",
        "inputs/split-",
        "split.parquet",
    ):
        assert expected in names, expected
    for secret in run.secrets:
        leaks = [name for name, data in written.items() if secret.encode() in data]
        assert not leaks, f"{secret[:9]} found in {leaks}"


# --- no unpickling of stored data --------------------------------------------------------------

_PICKLE_LOADERS = {"pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def test_library_never_unpickles_stored_data() -> None:
    """Static check of capray/: no pickle-family imports, every np.load passes allow_pickle=False,
    no torch.load/pd.read_pickle. (Ray pickles task arguments in memory: that is Ray's own
    protocol between trusted processes, not data read from storage.)"""
    problems = []
    for path in sorted((REPO / "capray").glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                )
                if any(n.split(".")[0] in _PICKLE_LOADERS for n in names):
                    problems.append(f"{path.name}:{node.lineno} imports {names}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                if (
                    name in ("read_pickle", "loads")
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in ("pd", "pickle")
                ):
                    problems.append(f"{path.name}:{node.lineno} {name}")
                if (
                    name == "load"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id in ("np", "numpy", "torch")
                ):
                    safe = any(
                        k.arg == "allow_pickle" and isinstance(k.value, ast.Constant) and k.value.value is False
                        for k in node.keywords
                    )
                    if not safe:
                        problems.append(
                            f"{path.name}:{node.lineno} {node.func.value.id}.load without allow_pickle=False"
                        )
    assert not problems, problems
    # The check sees the calls that matter (it would not pass vacuously).
    assert "allow_pickle=False" in (REPO / "capray/checkpoint.py").read_text()


# --- pixel bombs --------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height RGB pixels but carries almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_image_above_the_pixel_limit_is_refused_before_decoding() -> None:
    """100,000 x 100,000 RGB would need 30 GB: decoded under a 3 GiB address-space limit, it is
    refused from its header, fast, with no allocation of its pixels."""
    bomb = _png_header(100_000, 100_000)
    assert len(bomb) < 200
    script = textwrap.dedent(f"""
        import resource, sys, time
        from capray.images import ImageDecodeError, decode
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        t = time.perf_counter()
        try:
            decode({bomb!r}, 64_000_000)
        except ImageDecodeError as e:
            print(f"{{time.perf_counter() - t:.3f}} {{e}}")
            sys.exit(0)
        sys.exit("decoded")
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seconds, message = done.stdout.split(" ", 1)
    assert message.startswith("image too large") and "10000000000 pixels" in message, message
    assert float(seconds) < 1.0
