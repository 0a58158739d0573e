"""Every scheduling file in jobs/ loads, carries the fields its scheduler requires, and agrees with the others.

No Kubernetes here: the KubeRay manifests are checked field by field against what the RayJob CRD
and batch/v1 CronJob require, and the CronJob's own shell script renders the dated RayJob for real.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from datetime import UTC, date, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from ray.runtime_env import RuntimeEnv

from qwenbatch.cli import parser
from qwenbatch.config import load_config
from qwenbatch.dates import with_date

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"
KUBERAY = JOBS / "kuberay"
# Cron fields: minute, hour, day of month, month, day of week, with their bounds.
CRON_BOUNDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _by_kind(path: Path) -> dict[str, dict[str, Any]]:
    docs = _docs(path)
    kinds = {doc["kind"]: doc for doc in docs}
    assert len(kinds) == len(docs), f"{path.name}: one document per kind"
    return kinds


def _rayjob() -> dict[str, Any]:
    (doc,) = _docs(KUBERAY / "rayjob.yaml")
    return doc


def _workdir() -> str:
    return re.search(r"^WORKDIR\s+(\S+)", (JOBS / "Dockerfile").read_text(), re.M).group(1)


def test_every_file_in_jobs_is_covered() -> None:
    """A new file in jobs/ must come with a check here."""
    found = {str(p.relative_to(JOBS)) for p in JOBS.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert found == {
        "run.py",
        "runtime_env.yaml",
        "nightly.sh",
        "nightly.yaml",
        "crontab",
        "Dockerfile",
        "kuberay/rayjob.yaml",
        "kuberay/cronjob.yaml",
        "kuberay/kustomization.yaml",
        "gpu_check.sh",
        "gpu_pack.sh",
    }


def test_runtime_env_is_valid_for_ray() -> None:
    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    RuntimeEnv(**env, working_dir=str(ROOT))  # Ray's own validation: types of excludes and env_vars
    assert {".git/", ".venv/"} <= set(env["excludes"])
    assert "working_dir" not in env  # given on the command line: `--working-dir .`


def test_rayjob_has_what_kuberay_requires() -> None:
    job = _rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"] == "qwenbatch-nightly"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    shared = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())["env_vars"]
    assert runtime_env["env_vars"] == shared  # one set of job env vars, for `ray job submit` and KubeRay

    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # the CRD wants strings
    (head_container,) = head["template"]["spec"]["containers"]
    assert head_container["image"]
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] == head_container["image"]  # one image for the whole cluster
        gpus += group["replicas"] * int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
    from_line = re.search(r"^FROM rayproject/ray:(\S+?)-", (JOBS / "Dockerfile").read_text(), re.M)
    assert cluster["rayVersion"] == from_line.group(1)

    # The entrypoint runs jobs/run.py on jobs/nightly.yaml from the image's copy of this repository.
    words = shlex.split(spec["entrypoint"])
    assert words[0] == "python" and words[2] == "--config"
    workdir = _workdir() + "/"
    script, config_path = (Path(w.removeprefix(workdir)) for w in (words[1], words[3]))
    assert words[1].startswith(workdir) and script == Path("jobs/run.py") and (ROOT / script).is_file()
    assert words[3].startswith(workdir) and (ROOT / config_path).is_file()
    args = parser().parse_args(["run", str(ROOT / config_path), *words[4:]])
    nightly = load_config(args.config, args.overrides)
    assert nightly.run.replicas * nightly.run.gpus_per_replica == gpus  # every GPU worker holds a replica


def test_dockerfile_copies_what_the_job_needs() -> None:
    text = (JOBS / "Dockerfile").read_text()
    sources = [word for line in re.findall(r"^COPY (.+)$", text, re.M) for word in line.split()[1:-1]]
    assert sources and all((ROOT / s).exists() for s in sources if not s.startswith("--"))
    assert {"qwenbatch", "jobs", "pyproject.toml"} <= set(sources)
    assert _workdir().startswith("/")


def test_cronjob_creates_a_dated_rayjob_with_just_enough_rights(tmp_path: Path) -> None:
    docs = _by_kind(KUBERAY / "cronjob.yaml")
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    _check_schedule(cron["spec"]["schedule"].split())
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")

    account = docs["ServiceAccount"]["metadata"]["name"]
    assert pod["serviceAccountName"] == account
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "qwenbatch-nightly"}
    assert {"kind": "ServiceAccount", "name": account} in binding["subjects"]
    (rule,) = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"] and "create" in rule["verbs"]

    # The ConfigMap the pod mounts is the one kustomization.yaml makes from rayjob.yaml.
    kustomization = yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())
    assert all((KUBERAY / r).is_file() for r in kustomization["resources"])
    (generated,) = kustomization["configMapGenerator"]
    assert generated["files"] == ["rayjob.yaml"] and kustomization["generatorOptions"]["disableNameSuffixHash"]
    (volume,) = pod["volumes"]
    assert volume["configMap"]["name"] == generated["name"]
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    assert mount["name"] == volume["name"]

    # Run the container's own script, reading this rayjob.yaml and printing instead of `kubectl create`.
    command, script = container["command"], container["args"][0]
    assert command == ["/bin/sh", "-c"]
    mounted = f"{mount['mountPath']}/rayjob.yaml"
    assert mounted in script and "| kubectl create -f -" in script
    local = script.replace(mounted, str(KUBERAY / "rayjob.yaml")).replace("| kubectl create -f -", "")
    before = datetime.now(UTC).strftime("%Y%m%d")  # the script dates the name in UTC
    rendered = yaml.safe_load(subprocess.run(["sh", "-c", local], capture_output=True, text=True, check=True).stdout)
    after = datetime.now(UTC).strftime("%Y%m%d")
    assert rendered["metadata"]["name"] in {f"qwenbatch-nightly-{before}", f"qwenbatch-nightly-{after}"}
    expected = _rayjob()
    expected["metadata"]["name"] = rendered["metadata"]["name"]
    assert rendered == expected  # only the name changes


def _check_schedule(fields: list[str]) -> None:
    assert len(fields) == 5, fields
    for field, (low, high) in zip(fields, CRON_BOUNDS, strict=True):
        for part in field.split(","):
            base, _, step = part.partition("/")
            assert not step or step.isdigit()
            if base == "*":
                continue
            numbers = [int(n) for n in base.split("-")]
            assert all(low <= n <= high for n in numbers) and numbers == sorted(numbers), field


def _crontab_entries() -> tuple[dict[str, str], list[tuple[list[str], str]]]:
    env: dict[str, str] = {}
    entries = []
    for line in (JOBS / "crontab").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if re.match(r"^[A-Z_]+=", line):
            name, _, value = line.partition("=")
            env[name] = value
            continue
        fields = line.split(None, 5)
        entries.append((fields[:5], fields[5]))
    return env, entries


def test_crontab_line_parses_and_names_real_files() -> None:
    env, entries = _crontab_entries()
    assert env["RAY_ADDRESS"].startswith("http")  # where `ray job submit` finds the job server
    (schedule, command), *others = entries
    assert not others
    _check_schedule(schedule)
    assert "%" not in command  # cron turns an unescaped % into a newline
    words = shlex.split(command)
    assert "jobs/nightly.sh" in words
    for word in words:
        if word.startswith(("jobs/", "configs/")):
            assert (ROOT / word).is_file(), word
    script = ROOT / "jobs/nightly.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)  # syntax

    # What the line runs: `nightly.sh CONFIG qwenbatch-run-arguments`, with a config of dated paths.
    after = words[words.index("jobs/nightly.sh") + 1 :]
    end = after.index(">>") if ">>" in after else len(after)
    args = parser().parse_args(["run", str(ROOT / after[0]), *after[1:end]])
    assert args.date == "yesterday"
    config = load_config(args.config, args.overrides)
    one, two = (with_date(config, date(2026, 11, day)) for day in (25, 26))
    assert one.input.path != two.input.path and one.output.path != two.output.path
    assert "2026/11/25" in one.output.path and "2026-11-25" in one.input.path


def test_entrypoint_passes_arguments_through() -> None:
    """`python jobs/run.py --config C ARGS` is `qwenbatch run C ARGS`: here, its config check fails cleanly."""
    result = subprocess.run(
        [sys.executable, str(JOBS / "run.py"), "--config", str(JOBS / "nightly.yaml"), "run.batch_size=0"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    assert "run.batch_size" in result.stderr
    assert result.stdout.startswith(f"qwenbatch {metadata.version('qwenbatch')} from ")


def test_gpu_check_runs_its_steps_end_to_end(tmp_path: Path) -> None:
    """jobs/gpu_check.sh's smoke mode: the same three runs (plain, qwenbatch, compile), tiny model, on CPU."""
    env = {**os.environ, "QWENBATCH_GPU_CHECK_SMOKE": "1", "QWENBATCH_GPU_CHECK_DIR": str(tmp_path / "work"),
           "OUT": str(tmp_path / "out"), "PYTHONPATH": str(ROOT)}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(["bash", str(JOBS / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "bench.json").read_text())
    runs = {row["name"]: row for row in results["end_to_end"]}
    assert list(runs) == ["plain transformers loop (batch 4)", "qwenbatch", "qwenbatch, generation.compile"]
    assert all(row["images"] == 4 and row["output_tokens"] == 4 * 128 for row in runs.values())
    assert all(0 < runs[name]["gpu_busy"] <= 1 for name in ("qwenbatch", "qwenbatch, generation.compile"))
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "| gpu_busy | MFU |" in table
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert re.search(r"^gpu_check: \d+ s$", log, re.M) and table.splitlines()[0] in log
