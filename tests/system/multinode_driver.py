"""Driver run by test_multinode.py in its own process: a head and two worker nodes on this machine
(`ray.cluster_utils.Cluster`), the extraction and caption jobs spread over them, and one worker node
killed in the middle of the caption job. Prints one JSON line with what it observed."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import proctree
import ray
from ray.cluster_utils import Cluster

from capray import extraction
from capray.captioning import caption
from capray.config import load_config
from capray.runtime import RUNTIME_ENV


def map_workers(raylet_pid: int) -> int:
    """Ray Data map actors running on the node of this raylet (its descendant processes)."""
    return len(proctree.titled(proctree.descendants(raylet_pid), b"ray::MapWorker"))


def raylet_pid(node: Any) -> int:
    """The process id of a cluster node's raylet (a `ray._private.node.Node`)."""
    return node.all_processes["raylet"][0].process.pid


def run_job(job: Callable[[], Any], nodes: dict, until: Callable[[], bool] | None) -> dict:
    """Run `job()` in a thread; sample which nodes host map actors until `until()` returns true
    (then call it no more), and return the job's result or error plus the nodes seen."""
    outcome: dict = {"nodes_with_actors": set()}

    def target() -> None:
        try:
            outcome["result"] = job()
        except Exception as e:  # noqa: BLE001 (reported to the test)
            outcome["error"] = f"{type(e).__name__}: {e}"

    thread = threading.Thread(target=target)
    thread.start()
    fired = False
    while thread.is_alive():
        for name, node in nodes.items():
            try:
                if map_workers(raylet_pid(node)):
                    outcome["nodes_with_actors"].add(name)
            except (KeyError, IndexError):
                pass
        if not fired and until is not None and until():
            fired = True
        time.sleep(0.5)
    thread.join()
    outcome["nodes_with_actors"] = sorted(outcome["nodes_with_actors"])
    return outcome


def main(images: str, checkpoint: str, work: str) -> None:
    """Build the cluster, run both jobs, kill a worker node mid caption job, print the report."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 300 << 20})
    workers = {f"worker{i}": cluster.add_node(num_cpus=2, object_store_memory=300 << 20) for i in (1, 2)}
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=RUNTIME_ENV)
    nodes = {"head": cluster.head_node, **workers}
    report: dict = {}

    uris = sorted(str(p) for p in Path(images).glob("*.jpg"))
    cfg = load_config(
        None,
        [
            f"work_dir={work}",
            "backbone.weights=random",
            "extract.batch_size=4",
            "extract.min_actors=2",
            "extract.max_actors=2",
            "inputs.shard_rows=4",
        ],
    )
    report["extract"] = run_job(
        lambda: {k: v for k, v in extraction.extract(cfg, uris, f"{work}/features").items() if k != "errors"},
        nodes,
        None,
    )

    cfg = load_config(
        None,
        [
            f"work_dir={work}",
            "caption.batch_size=2",
            "inputs.shard_rows=2",
            "caption.min_actors=2",
            "caption.max_actors=2",
        ],
    )
    out = f"{work}/captions"
    killed: dict = {}

    def kill_when_output_appears() -> bool:
        if not list(Path(out).glob("[!_]*.parquet")):  # a shard file, not the index written first
            return False
        # The worker node hosting a map actor, so that work in flight is lost with it.
        name = next((n for n, node in workers.items() if map_workers(raylet_pid(node))), "worker1")
        killed["node"], killed["files_before"] = name, len(list(Path(out).glob("[!_]*.parquet")))
        cluster.remove_node(workers[name], allow_graceful=False)
        return True

    report["caption"] = run_job(lambda: caption(cfg, checkpoint, images, out), nodes, kill_when_output_appears)
    report["killed"] = killed
    print("RESULT " + json.dumps(report, default=str), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
