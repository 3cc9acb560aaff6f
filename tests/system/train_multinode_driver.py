"""Driver run by test_train_multinode.py in its own process: `capray train` on a head and two worker
nodes on this machine (`ray.cluster_utils.Cluster`), hit by two faults in turn: once Ray Train
has registered a mid-epoch checkpoint, one training worker process is SIGKILLed (its node
lives on); once the restarted run has registered a later mid-epoch checkpoint, a worker node
hosting a training worker is killed. Prints one JSON line with what it observed.

Every node declares one GPU, which this machine does not have: Ray schedules by declared
resources, so training workers of one GPU each (`ray.use_gpu=true`) land on two different nodes,
and TensorFlow in them finds no CUDA device and runs on the CPU. The head's GPU leaves room for
the restarted workers once a node is gone."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import proctree
import ray
from ray.cluster_utils import Cluster

from capray.cli import main as capray_main


def node_processes(node: Any) -> list[int]:
    """The processes a cluster node started: its raylet's descendants (workers included)."""
    try:
        return proctree.descendants(node.all_processes["raylet"][0].process.pid)
    except (KeyError, IndexError):
        return []  # removed


def train_workers(node: Any) -> int:
    """Ray Train worker processes on a cluster node."""
    return len(proctree.titled(node_processes(node), b"ray::RayTrainWorker"))


def kill_node(cluster: Cluster, node: Any) -> None:
    """The node dies at once, as a machine does: its worker processes, which would otherwise go on
    training for seconds until they notice their raylet is gone, first, then Ray's own processes
    (`remove_node`)."""
    for pid in node_processes(node):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass  # already gone
    cluster.remove_node(node, allow_graceful=False)


def registered_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train's controller has registered (a folder on disk is not
    enough: one not registered yet when a node dies is not resumed from)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    return sorted(r["metrics"]["step"] for r in snapshot["checkpoint_results"])


def mid_epoch_steps(run_dir: Path) -> set[int]:
    """Steps of the checkpoints on disk taken inside an epoch."""
    steps = set()
    for path in run_dir.glob("checkpoint_*/state.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # being written
        if state.get("epoch_step"):
            steps.add(state["step"])
    return steps


def main(run_dir: str, *train_args: str) -> None:
    """Build the cluster, run `capray train` in a thread, kill a node hosting a training worker once
    a mid-epoch checkpoint is registered, and print the report."""
    start = time.monotonic()
    node_args = {"num_cpus": 2, "num_gpus": 1, "object_store_memory": 200 << 20}
    cluster = Cluster(initialize_head=True, head_node_args=node_args)
    workers = {f"worker{i}": cluster.add_node(**node_args) for i in (1, 2)}
    cluster.wait_for_nodes()
    nodes = {"head": cluster.head_node, **workers}
    # Seconds from the start of this process's work: where the test's time goes.
    report: dict = {"nodes_with_workers": [], "killed": None, "seconds": {"cluster": time.monotonic() - start}}

    def train() -> None:
        report["exit_code"] = capray_main(["train", *train_args, f"ray.address={cluster.address}"])

    thread = threading.Thread(target=train)
    thread.start()
    run = Path(run_dir)
    while thread.is_alive():
        steps = registered_steps(run)
        if steps and steps[-1] in mid_epoch_steps(run):
            if "process_killed_on" not in report:
                # First fault: one training worker process dies; its node and the other worker live on.
                victims = [
                    (name, pid)
                    for name, node in nodes.items()
                    for pid in proctree.titled(node_processes(node), b"ray::RayTrainWorker")
                ]
                if victims:
                    os.kill(victims[0][1], signal.SIGKILL)
                report["process_killed_on"] = victims[0][0] if victims else ""
                report["registered_at_process_kill"] = steps[-1]
                report["seconds"]["process_kill"] = time.monotonic() - start
            elif report["killed"] is None and steps[-1] > report["registered_at_process_kill"]:
                # Second fault, in the restarted run: a worker node (the head carries the driver
                # and Ray Train's controller) dies with its training worker.
                hosting = sorted(name for name, node in nodes.items() if train_workers(node))
                report["nodes_with_workers"], report["registered_at_kill"] = hosting, steps[-1]
                name = next((n for n in hosting if n != "head"), "")
                if name:
                    kill_node(cluster, workers[name])
                report["killed"], report["seconds"]["kill"] = name, time.monotonic() - start
        time.sleep(0.2)  # polling interval for the event, not synchronisation
    thread.join()
    report["seconds"]["trained"] = time.monotonic() - start
    print("RESULT " + json.dumps(report), flush=True)
    ray.shutdown()  # capray's job leaves this process connected; the cluster refuses to stop under it
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
