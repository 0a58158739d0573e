"""A real two-node Ray cluster on this machine: `jobs/nightly.sh` submits the job, a replica on each node works.

The nodes use the loopback addresses 127.0.0.2 (head) and 127.0.0.3 (worker): Ray rewrites 127.0.0.1
to the machine's network address when nodes join a cluster, but keeps any other 127/8 address. The
cluster has its own temp dir, ports and auth token, so it never meets the session's local Ray, and
it is stopped by process group, also when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from qwenbatch import schema
from qwenbatch.config import load_config
from qwenbatch.hub import load_kwargs
from qwenbatch.pipeline import Placement, build_stages
from tests.helpers import job_config, read_output, write_images, write_manifest

ROOT = Path(__file__).resolve().parent.parent
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 300
STOP_GRACE_S = 3


@dataclass
class Cluster:
    dashboard: str  # the job server: http://127.0.0.1:PORT
    env: dict[str, str]  # what a client needs: RAY_ADDRESS and the auth token
    headers: dict[str, str]
    temp_dir: Path
    node_ips: dict[str, str]  # node id -> address


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _ours(token: str) -> list[psutil.Process]:
    """Every process of this cluster, and only those: they all inherited its unique auth token."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("RAY_AUTH_TOKEN") == token:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _stop(nodes: list[subprocess.Popen], token: str) -> None:
    """Ask each `ray start --block` (its node's process group leader) to stop, then kill what is left."""
    for node in nodes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGTERM)
    deadline = time.time() + STOP_GRACE_S
    for node in nodes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=max(0.1, deadline - time.time()))
    left = _ours(token)
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(left, timeout=STOP_GRACE_S)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    temp_dir = Path(tempfile.mkdtemp(prefix="qbray-", dir="/tmp"))  # short: Ray's socket paths must fit
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the job's `python` and `ray`
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
    )
    gcs, dashboard, head_agent, client, worker_agent = _free_ports(5)
    common = ["--block", f"--temp-dir={temp_dir}", "--num-cpus=2", "--object-store-memory=150000000"]
    nodes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> None:
        with open(temp_dir / f"{name}.log", "wb") as log:  # the node keeps its own handle
            command = ["ray", "start", *common, *args]
            nodes.append(subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True))

    url = f"http://127.0.0.1:{dashboard}"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        start(
            "head",
            "--head",
            f"--node-ip-address={HEAD_IP}",
            f"--port={gcs}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={head_agent}",
            f"--ray-client-server-port={client}",
        )
        state = StateApiClient(address=url, headers=headers)
        _wait_for(lambda: _alive_nodes(state, StateResource, ListApiOptions), 1, temp_dir, "head")
        start(
            "worker",
            f"--address={HEAD_IP}:{gcs}",
            f"--node-ip-address={WORKER_IP}",
            f"--dashboard-agent-listen-port={worker_agent}",
        )
        alive = _wait_for(lambda: _alive_nodes(state, StateResource, ListApiOptions), 2, temp_dir, "worker")
        env["RAY_ADDRESS"] = url
        yield Cluster(url, env, headers, temp_dir, alive)
    finally:
        _stop(nodes, token)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _alive_nodes(state, resource, options) -> dict[str, str]:
    try:
        found = state.list(resource.NODES, options=options(detail=True), raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - the dashboard is not up yet
        return {}
    return {node.node_id: node.node_ip for node in found if node.state == "ALIVE"}


def _wait_for(probe, count: int, temp_dir: Path, name: str) -> dict[str, str]:
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if len(found := probe()) >= count:
            return found
        time.sleep(1)
    log = (temp_dir / f"{name}.log").read_text(errors="replace")[-3000:]
    raise AssertionError(f"Ray {name} node did not come up in {START_TIMEOUT_S}s:\n{log}")


def test_nightly_job_runs_a_replica_on_each_node(cluster: Cluster, tiny_model: Path, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    # 8 blocks of rows: more than one replica takes at once (two in flight), so both get work.
    count = 8 * schema.MIN_BLOCK_ROWS
    images = write_images(tmp_path / "images", 8, sizes=[(48, 40), (64, 64)])
    rows = [{"id": f"r{i:03d}", "image": str(images[i % len(images)])} for i in range(count)]
    write_manifest(tmp_path / "in/2026-11-25/manifest.parquet", rows)
    config = job_config(
        tiny_model,
        tmp_path / "in/{date}",
        tmp_path / "out/{date}",
        generation={"max_new_tokens": 32, "min_new_tokens": 32},
        image={"allowed_prefixes": [str(tmp_path)]},
        run={"replicas": 2, "batch_size": 4},
    )
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))

    # The crontab's command, against this cluster.
    submit = subprocess.run(
        [str(ROOT / "jobs/nightly.sh"), str(config_path), "--date", "2026-11-25"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT_S,
    )
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]

    client = JobSubmissionClient(cluster.dashboard, headers=cluster.headers)
    (job,) = [j for j in client.list_jobs() if (j.submission_id or "").startswith("qwenbatch-nightly-")]
    assert job.status == JobStatus.SUCCEEDED
    logs = client.get_job_logs(job.submission_id)
    output = tmp_path / "out/2026-11-25"
    assert f"succeeded: {output}" in logs and f"rows {count}  ok {count}  errors 0" in logs

    # The job ran the submitted working_dir's copy of qwenbatch, uploaded without .venv or .git.
    shipped = Path(re.search(r"^qwenbatch \S+ from (\S+)$", logs, re.M).group(1)).parent
    assert shipped != ROOT and (shipped / "jobs/run.py").is_file()
    assert not (shipped / ".venv").exists() and not (shipped / ".git").exists()

    table = read_output(output)
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)  # each once
    assert set(table.column("status").to_pylist()) == {schema.OK}

    # Both nodes did work: a model replica on each, and each finished generate tasks.
    state = StateApiClient(address=cluster.dashboard, headers=cluster.headers)
    options = ListApiOptions(filters=[("job_id", "=", job.job_id)], detail=True, limit=10_000)
    tasks = state.list(StateResource.TASKS, options=options, raise_on_missing_output=False)
    generate = [t for t in tasks if "Generator" in t.name and t.name.endswith(".submit")]
    assert all(t.state == "FINISHED" for t in generate)
    per_node = Counter(cluster.node_ips[t.node_id] for t in generate)
    assert set(per_node) == {HEAD_IP, WORKER_IP}, per_node
    actors = state.list(StateResource.ACTORS, options=options, raise_on_missing_output=False)
    replicas = [a for a in actors if "Generator" in a.class_name]
    assert len(replicas) == 2 and {cluster.node_ips[a.node_id] for a in replicas} == {HEAD_IP, WORKER_IP}


def test_large_model_config_shards_one_model_over_two_gpus() -> None:
    """configs/caption-32b.yaml: each replica is one actor holding 2 GPUs, and loads with device_map."""
    config = load_config(ROOT / "configs/caption-32b.yaml", ["input.path=/in", "output.path=/out"])
    assert config.model.name == "Qwen/Qwen3-VL-32B-Instruct" and config.run.gpus_per_replica == 2

    placement = Placement.for_cluster(config, cluster_gpus=8, cluster_cpus=64)
    assert (placement.device, placement.gpus_per_replica) == ("cuda", 2)
    infer = next(stage for stage in build_stages(config, placement, "run") if stage.name == "infer")
    assert (infer.num_gpus, infer.kwargs["gpus"], infer.kwargs["device"]) == (2, 2, "cuda")
    assert infer.concurrency == config.run.replicas == 4
    # run.device: cuda: with one GPU short of a replica it still asks for GPUs, never runs 32B on CPU.
    assert Placement.for_cluster(config, cluster_gpus=1, cluster_cpus=8).gpus_per_replica == 2

    # The actor's model loads with accelerate's device_map over its GPUs; one GPU or CPU: no device_map.
    assert load_kwargs(config.model, "cuda", 2)["device_map"] == "auto"
    assert "device_map" not in load_kwargs(config.model, "cuda", 1)
    assert "device_map" not in load_kwargs(config.model, "cpu", 2)
    assert load_kwargs(config.model, "cuda", 2)["dtype"] == torch.bfloat16


def test_cpu_replica_computes_on_the_cores_and_infer_sorts_a_window(tmp_path: Path) -> None:
    """A replica on CPU may run torch on its share of the cores; the infer stage takes several
    batches' rows at once, so grouping by image tokens has rows to group."""
    config = job_config(Path("/models/tiny"), tmp_path / "m.parquet", tmp_path / "out", run={"batch_size": 4})
    on_cpu = Placement.for_cluster(config, cluster_gpus=0, cluster_cpus=8)
    assert on_cpu.cpu_threads == 8
    infer = next(stage for stage in build_stages(config, on_cpu, "run") if stage.name == "infer")
    assert infer.kwargs["cpu_threads"] == 8
    assert infer.batch_size == 4 * schema.SORT_WINDOW_BATCHES and infer.kwargs["batch_size"] == 4

    two = job_config(Path("/models/tiny"), tmp_path / "m.parquet", tmp_path / "out", run={"replicas": 2})
    assert Placement.for_cluster(two, cluster_gpus=0, cluster_cpus=8).cpu_threads == 4
