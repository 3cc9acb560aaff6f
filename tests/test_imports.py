"""The driver side stays light: the modules a job's driver and its Ray Data tasks import do not load
TensorFlow (only the model actors and training workers do)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Ray Data runs functions of these modules in fresh worker processes: importing TensorFlow there
# costs seconds of CPU per process, for nothing.
TF_FREE = [
    "capray.config",
    "capray.schema",
    "capray.hardware",
    "capray.logs",
    "capray.reader",
    "capray.writer",
    "capray.worker",
    "capray.batch_model",
    "capray.runner",
    "capray.storage",
    "capray.text",
    "capray.images",
    "capray.inputs",
    "capray.pipeline",
    "capray.data",
    "capray.extraction",
    "capray.featurestore",
    "capray.captioning",
    "capray.runtime",
    "capray.checkpoint",
    "capray.backbone",
    "capray.tfquiet",
    "capray.cli",
    "capray.api",
    "capray.export",
    "capray.listing",
    "capray.shards",
    "capray.audit",
    "capray.progress",
    "capray.status",
    "capray.overview",
    # Ray Train's DatasetManager actor unpickles the trainer's dataset_config.
    "capray.train.sharding",
    "capray.train.backend",
]


def test_modules_do_not_import_tensorflow() -> None:
    # One interpreter imports them one after the other (a process each cost ~20 CPU-s in all):
    # as long as none loads TensorFlow, each was imported without it; the first that does is named.
    script = (
        "import importlib, sys\n"
        f"for module in {TF_FREE!r}:\n"
        "    importlib.import_module(module)\n"
        "    loaded = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "    print(module, loaded)\n"
        "    if loaded: break\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last == f"{TF_FREE[-1]} []", f"importing {last.replace(' [', ' loads [')}"


def test_the_training_package_loads_its_parts_on_first_use() -> None:
    # `import capray.train` (what unpickling capray.train.sharding in Ray Train's DatasetManager
    # does first) loads no TensorFlow; each public name then resolves from job.py or loop.py.
    script = (
        "import sys, capray.train as t; tf = 'tensorflow' in sys.modules; "
        "print(tf, [n for n in t.__all__ if not callable(getattr(t, n))], 'tensorflow' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False [] True"
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        import capray.train

        capray.train.no_such_name  # noqa: B018 (the attribute access is what is tested)


def test_model_imports_no_ray() -> None:
    # capray/model.py is plain Keras: usable (and testable) without a Ray installation in sight.
    script = "import sys, capray.model; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def _import_graph() -> dict[str, set[str]]:
    """capray module -> the capray modules it imports, at module level or inside functions alike
    (a lazy import hides a circle from Python, not from the reader)."""
    import ast

    root = Path(__file__).resolve().parents[1] / "capray"
    files = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name: str) -> str | None:
        while name not in files:
            if "." not in name:
                return None
            name = name.rsplit(".", 1)[0]
        return name

    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for name in names:
                target = owner(name) if name.startswith("capray") else None
                # A package's __init__ re-exporting its own modules is not a dependency between layers.
                if target and target != module and not target.startswith(module + "."):
                    graph[module].add(target)
    return graph


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_circle_finder_finds_one() -> None:
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _circle({"a": {"b"}, "b": set()}) is None


def test_capray_modules_import_each_other_one_way() -> None:
    graph = _import_graph()
    assert {"capray.model", "capray.config", "capray.featurestore"} <= set(graph)
    assert _circle(graph) is None, "import circle: " + " -> ".join(_circle(graph) or [])
    # The lowest layer imports nothing above it: plain Python, pyarrow and PIL only.
    for base in ("capray.storage", "capray.text", "capray.images"):
        assert graph[base] == set(), f"{base} imports {graph[base]}"
    # Job modules never import each other: composition lives in capray.runner (and the demo).
    jobs = {"capray.extraction", "capray.captioning", "capray.train", "capray.evaluate"}
    for job in jobs:
        inside = {m for m in graph if m == job or m.startswith(job + ".")}
        for m in inside:
            assert not {t for t in graph[m] - inside if any(t == j or t.startswith(j + ".") for j in jobs)}, m


# The layers of docs/architecture.md, lowest first: a module imports modules of its own layer or
# below, never above. Every capray module is in exactly one (a new module is placed on purpose).
LAYERS = {
    "base": {"storage", "text", "images", "schema", "hardware", "logs", "tfquiet"},
    "config": {"config", "runtime"},
    "blocks": {
        "listing",
        "inputs",
        "reader",
        "writer",
        "worker",
        "batch_model",
        "pipeline",
        "shards",
        "progress",
        "featurestore",
        "data",
        "synthetic",
        "backbone",
        "model",
        "decoder",
        "checkpoint",
    },
    "jobs": {"extraction", "captioning", "train", "evaluate", "export"},
    "composition": {"runner", "audit", "demo", "status", "overview"},
    "faces": {"cli", "api", "__main__", "configdoc"},
}


def _layer(module: str) -> int:
    """The index in LAYERS of a capray module (a package's submodules share its layer)."""
    name = module.removeprefix("capray.").split(".")[0]
    found = [i for i, members in enumerate(LAYERS.values()) if name in members]
    assert len(found) == 1, f"{module} is in {len(found)} layers of LAYERS: place it in one"
    return found[0]


def test_modules_import_only_their_own_layer_or_below() -> None:
    graph = _import_graph()
    names = list(LAYERS)
    upward = [
        f"{m} ({names[_layer(m)]}) imports {t} ({names[_layer(t)]})"
        for m in sorted(graph)
        if m != "capray"
        for t in sorted(graph[m])
        if t != "capray" and _layer(t) > _layer(m)
    ]
    assert not upward, "imports against the layers: " + "; ".join(upward)


def test_the_two_faces_share_the_runner_and_never_import_each_other() -> None:
    graph = _import_graph()
    assert "capray.cli" not in graph["capray.api"] and "capray.api" not in graph["capray.cli"]
    assert "capray.runner" in graph["capray.api"] and "capray.runner" in graph["capray.cli"]


def test_the_layer_rule_fails_on_an_upward_import() -> None:
    graph = {"capray.api": {"capray.cli"}, "capray.storage": {"capray.runner"}}
    assert [t for m in graph for t in graph[m] if _layer(t) > _layer(m)] == ["capray.runner"]
