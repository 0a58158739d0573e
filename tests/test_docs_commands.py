"""Every ```bash block of README.md and docs/*.md is run: here, in a sandbox, or by the registered test.

A block is either
- run by `test_sandboxed_blocks_run` below, in document order (README first, then docs/ by name), each
  block as one `bash -e -o pipefail` script in a temp folder, with the substitutions of SANDBOX; or
- listed in REGISTRY: its exact text, mapped to the test (`tests/FILE.py::FUNCTION`) that runs it or its
  exact equivalent, for commands a sandbox cannot run (a GPU, a remote cluster, Kubernetes, docker, an S3
  server, minutes of benchmark).
A new block is run in the sandbox unless registered; one that cannot run there fails
`test_sandboxed_blocks_run` with a message saying what to do, and a registry entry whose block is gone or
whose test does not exist fails `test_every_registry_entry_names_a_test_and_a_block`. Text that is not a
command goes in ```text, ```yaml or ```console fences, which are not collected (docs/development.md says
which ```console lines are not run anywhere).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO, private_ray_dirs, write_images

MODEL_ID = "Qwen/Qwen3-VL-8B-Instruct"
SETUP_PREFIX = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[test]" && '
DEMO = "qwenbatch demo --dir demo_out"
BLOCK_TIMEOUT_S = 300

# What the sandbox changes in a block before running it (docs/development.md lists the same):
# - `/data/` is the sandbox's own data/ folder; data/photos holds a few generated images;
# - the hub id Qwen/Qwen3-VL-8B-Instruct is the tiny model, placed under that id in a private Hugging Face
#   cache (HF_HOME, HF_HUB_OFFLINE=1);
# - the README's setup prefix (make a venv, pip install) is dropped: this test runs in the installed env;
# - the demo makes 4 images instead of 48 (`--images 4`): the same three runs, a quarter of a minute cheaper;
# - configs/ and jobs/ are links to the checkout's, so `configs/caption.yaml` resolves as in a clone.
SANDBOX = {"/data/": "{sandbox}/data/", SETUP_PREFIX: "", DEMO: f"{DEMO} --images 4"}

# Blocks run elsewhere: the block's exact text -> the test that runs it or its exact equivalent.
REGISTRY = {
    # docs/cluster-and-nightly.md: the cluster test submits the job the same way (jobs/nightly.sh runs
    # `ray job submit --runtime-env jobs/runtime_env.yaml --working-dir . -- python jobs/run.py --config ...`)
    # to a real two-node Ray cluster with token auth.
    "export RAY_ADDRESS=http://HEAD:8265     # the cluster's dashboard / job server\n"
    "ray job submit --runtime-env jobs/runtime_env.yaml --working-dir . \\\n"
    "  -- python jobs/run.py --config configs/caption.yaml \\\n"
    "     input.path=s3://my-bucket/manifests/ output.path=s3://my-bucket/captions run.replicas=8\n": (
        "tests/test_cluster.py::test_nightly_job_runs_a_replica_on_each_node"
    ),
    # needs 8 GPUs: the test checks the config's placement (two GPUs an actor) and load arguments on CPU.
    "qwenbatch run configs/caption-32b.yaml input.path=/data/manifests output.path=/data/captions-32b\n": (
        "tests/test_cluster.py::test_large_model_config_shards_one_model_over_two_gpus"
    ),
    # docker and Kubernetes: the test loads every KubeRay file and checks what KubeRay requires.
    "docker build -f jobs/Dockerfile -t ghcr.io/your-org/qwenbatch:0.1.0 . "
    "&& docker push ghcr.io/your-org/qwenbatch:0.1.0\n"
    "kubectl apply -k jobs/kuberay/                  "
    "# the CronJob, its ServiceAccount and Role, the RayJob's ConfigMap\n"
    "kubectl create -f jobs/kuberay/rayjob.yaml      # one run now, by hand\n": (
        "tests/test_jobs_files.py::test_rayjob_has_what_kuberay_requires"
    ),
    # docs/errors-and-reruns.md: the same flag on a run with half its rows bad, through the CLI.
    "qwenbatch run configs/caption.yaml input.path=/data/manifests output.path=/data/captions --max-error-rate 0.1\n": (
        "tests/test_resume.py::test_error_rate_summary_and_reruns"
    ),
    "qwenbatch run configs/caption.yaml input.path=/data/manifests output.path=/data/captions --retry-errors\n"
    "qwenbatch run configs/caption.yaml input.path=/data/manifests output.path=/data/captions "
    "--retry-errors load_error,infer_error\n": ("tests/test_retry.py::test_retry_errors_cli"),
    # docs/inputs.md: a manifest of a folder, then a run over it reading that folder without allowed_prefixes.
    "qwenbatch manifest /data/archive /data/manifests/archive.parquet\n"
    "qwenbatch run configs/caption.yaml input.path=/data/manifests/archive.parquet "
    "output.path=/data/archive-captions\n": ("tests/test_manifest_cmd.py::test_manifest_root_run"),
    # an S3 server: the test runs this very command against moto, then a job over the manifest it wrote.
    "qwenbatch manifest s3://my-bucket/images s3://my-bucket/manifests/images.parquet\n": (
        "tests/test_storage_s3.py::test_job_reads_from_and_writes_to_s3_and_resumes_there"
    ),
    # docs/vllm.md: the script builds a 7 GB venv; the test is the one it runs.
    "bash .ci/run-vllm   # CPU: makes .venv-vllm, installs vLLM there, runs tests/test_vllm_engine.py\n": (
        "tests/test_vllm_engine.py::test_vllm_rows_equal_the_transformers_engine"
    ),
    # docs/performance.md: minutes of benchmark each; the smoke tests run the same commands on a few images.
    "qwenbatch bench --mode sim --dir sim_out     "
    "# 640 1024x768 JPEGs, then 256 4000x3000 ones without and with jpeg_draft\n": (
        "tests/test_bench.py::test_sim_bench_smoke"
    ),
    "qwenbatch bench --mode host --dir host_out\n": (
        "tests/test_bench.py::test_host_bench_times_a_decode_step_eager_and_compiled"
    ),
    "qwenbatch bench --mode scale --dir scale_out   "
    "# about 7 minutes once its data is built (a 10M-row output: some minutes)\n": (
        "tests/test_scale.py::test_scale_bench_smoke"
    ),
    "qwenbatch bench --dir bench_out                       # CPU: tiny model, 1000 mixed images, 1 in 4 a 12 MP JPEG\n"
    "qwenbatch bench --dir bench_out --max-pixels 262144   # the same with a 256-token pixel budget\n"
    "qwenbatch bench --dir bench_out --images 300          # 300 images\n": "tests/test_bench.py::test_cpu_bench_smoke",
    "flock -x /work/.cpu.lock .venv-vllm/bin/qwenbatch bench --dir bench_out --images 300\n": (
        "tests/test_bench.py::test_cpu_bench_smoke"
    ),
}


@dataclass(frozen=True)
class Block:
    page: str  # README.md or docs/NAME.md
    line: int  # of the opening fence
    text: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def bash_blocks() -> list[Block]:
    """Every ```bash block, in document order; an indented fence (inside a list item) counts too."""
    blocks = []
    for page in pages():
        lines = page.read_text().splitlines(keepends=True)
        index = 0
        while index < len(lines):
            opening = re.match(r"^(\s*)```(\S*)\s*$", lines[index])
            if not opening:
                index += 1
                continue
            indent, lang, start = opening.group(1), opening.group(2), index
            index += 1
            body = []
            while index < len(lines) and lines[index].strip() != "```":
                body.append(lines[index][len(indent) :] if lines[index].startswith(indent) else lines[index])
                index += 1
            index += 1
            if lang in ("bash", "sh", "shell", ""):
                assert lang == "bash", (
                    f"{page.relative_to(REPO)}:{start + 1}: a fence must name its language: ```bash for a command "
                    "(run by tests/test_docs_commands.py), ```text or ```console for output, ```yaml for config"
                )
                blocks.append(Block(str(page.relative_to(REPO)), start + 1, "".join(body)))
    return blocks


def sandboxed() -> list[Block]:
    return [block for block in bash_blocks() if block.text not in REGISTRY]


def test_blocks_are_found() -> None:
    texts = [block.text for block in bash_blocks()]
    assert any(text.endswith("qwenbatch demo --dir demo_out\n") for text in texts)
    assert any("qwenbatch manifest /data/photos" in text for text in texts)


def test_every_registry_entry_names_a_test_and_a_block() -> None:
    texts = {block.text for block in bash_blocks()}
    stale = [text for text in REGISTRY if text not in texts]
    assert not stale, (
        "REGISTRY entries that match no ```bash block any more (a page changed the command): update the key to "
        f"the block's new text, or remove the entry: {stale}"
    )
    for test in REGISTRY.values():
        path, _, function = test.partition("::")
        file = REPO / path
        assert file.exists(), f"REGISTRY names {test}, but {path} does not exist"
        functions = {node.name for node in ast.walk(ast.parse(file.read_text())) if isinstance(node, ast.FunctionDef)}
        assert function in functions, f"REGISTRY names {test}, but {path} has no function {function}"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The temp folder blocks run in: configs/ and jobs/ from the checkout, images under data/photos, and a
    private Hugging Face cache that holds the tiny model under the real model's id."""
    root = tmp_path_factory.mktemp("docs")
    for name in ("configs", "jobs"):
        (root / name).symlink_to(REPO / name)
    write_images(root / "data" / "photos", 3, sizes=[(64, 64), (96, 64)])  # small: the CPU's model is slow
    snapshot = root / "hf" / "hub" / f"models--{MODEL_ID.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    return root


def substitute(text: str, root: Path) -> str:
    for placeholder, value in SANDBOX.items():
        text = text.replace(placeholder, value.format(sandbox=root))
    return text


def test_sandboxed_blocks_run(sandbox: Path) -> None:
    """Each block not in REGISTRY, run as written but for SANDBOX's substitutions; each must exit 0."""
    blocks = sandboxed()
    assert blocks, "no block left to run here"
    done: set[str] = set()
    with private_ray_dirs(1) as (ray_dir,):
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        env |= {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(REPO),
            "HF_HOME": str(sandbox / "hf"),
            "HF_HUB_OFFLINE": "1",
            "RAY_TMPDIR": ray_dir,
        }
        for block in blocks:
            if block.text in done:  # the same command on two pages runs once
                continue
            done.add(block.text)
            script = substitute(block.text, sandbox)
            result = subprocess.run(
                ["bash", "-e", "-o", "pipefail", "-c", script],
                cwd=sandbox,
                env=env,
                capture_output=True,
                text=True,
                timeout=BLOCK_TIMEOUT_S,
            )
            assert result.returncode == 0, (
                f"{block.where}: this ```bash block exited {result.returncode} in the sandbox of "
                "tests/test_docs_commands.py. Fix the command, or, if it cannot run here (a GPU, a remote cluster, "
                "a download), add its exact text to REGISTRY with the test that runs it or its exact equivalent, "
                "or show it as ```console with a `$ ` prompt and say why in docs/development.md.\n"
                f"--- block ---\n{block.text}--- output (tail) ---\n{(result.stdout + result.stderr)[-3000:]}"
            )
    captions = sandbox / "data" / "captions"
    import pyarrow.dataset as pads

    rows = pads.dataset(str(captions), format="parquet").to_table().to_pylist()
    assert sorted(row["id"] for row in rows) == sorted(p.name for p in (sandbox / "data" / "photos").iterdir())
    assert all(row["status"] == "ok" for row in rows), rows
    eight_b = pads.dataset(str(sandbox / "data" / "captions-8b"), format="parquet").to_table()
    assert set(eight_b.column("model").to_pylist()) == {MODEL_ID}
