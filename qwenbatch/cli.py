"""The `qwenbatch` command: thin over the library calls."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qwenbatch.config import ConfigError, JobConfig, StorageConfig, load_config
from qwenbatch.console import DEFAULT_EVERY_S, ConsoleHandler, Progress, quiet_ray, report_command
from qwenbatch.dates import parse_date, with_date
from qwenbatch.inputs import ManifestError
from qwenbatch.lease import LeaseHeld, LeaseLost

log = logging.getLogger("qwenbatch")

DATE_HELP = "the day {date} and {date:%%Y/%%m/%%d} in input.path and output.path become: YYYY-MM-DD, today, yesterday"
CONFIG_HELP = "YAML job config (configs/caption.yaml documents every key)"
OVERRIDES_HELP = "key.path=value, e.g. run.batch_size=4"
DESCRIPTION = """\
Batch Qwen3-VL over image collections on Ray: captions, visual question answering and document
understanding (scans and PDFs, fields back as JSON). Parquet manifests in, Parquet out: every input
row gives exactly one output row, written once, and a rerun resumes where a stopped run left off."""
EPILOG = """\
examples:
  # the whole pipeline on this machine's CPUs: a tiny model, sample images and PDFs, three tasks
  qwenbatch demo --dir demo_out

  # a manifest for a folder of images, then a config run over it
  qwenbatch manifest /data/photos /data/photos/manifest.parquet
  qwenbatch run configs/caption.yaml input.path=/data/photos/manifest.parquet output.path=/data/captions

  # how that output stands, and its HTML report
  qwenbatch status /data/captions
  qwenbatch report /data/captions --out captions-report.html"""


def _print_summary(output: str, summary: dict) -> None:
    """Where the output is, its rows and top errors, and the command that draws its report."""
    run = summary.get("this_run", {})
    totals = summary.get("output", {})
    status = totals.get("status", {})
    errors = totals.get("rows", 0) - status.get("ok", 0)
    print(
        f"{summary.get('state', '?')}: {output}\n"
        f"  rows {totals.get('rows', 0)}  ok {status.get('ok', 0)}  errors {errors}  "
        f"(this run: {run.get('rows', 0)} rows, {run.get('images_per_s') or 0:.2f} images/s; "
        f"{summary.get('skipped_done', 0)} already done)"
    )
    for item in totals.get("top_errors", [])[:5]:
        print(f"  {item['count']:>6} x {item['error']}")
    if summary.get("state") == "failed":
        print(
            f"  failed: {summary.get('error_rate', 0):.0%} of the output's rows are errors, more than "
            f"output.max_error_rate ({summary.get('max_error_rate', 0):.0%}) allows; the most common is above. "
            "Fix its cause, then run again with --retry-errors"
        )
    print(f"  report: {report_command(output)}")


def _job_config(args: argparse.Namespace, *more: str) -> JobConfig:
    """The validated config with `--date` rendered into its paths, after the overrides (and `more` of them)."""
    return with_date(load_config(args.config, [*args.overrides, *more]), parse_date(args.date))


def _progress(args: argparse.Namespace) -> Progress:
    """A bar in a terminal; else a line every --progress-every seconds (and with --verbose, beside Ray's table)."""
    return Progress(every_s=args.progress_every, bar=False if args.verbose else None)


def cmd_run(args: argparse.Namespace) -> int:
    from qwenbatch.pipeline import run
    from qwenbatch.retry import parse_statuses

    limit = [f"output.max_error_rate={args.max_error_rate}"] if args.max_error_rate is not None else []
    config = _job_config(args, *limit)
    retry_errors = parse_statuses(args.retry_errors) if args.retry_errors else ()
    quiet_ray(args.verbose)
    result = run(config, force=args.force, retry_errors=retry_errors, progress=_progress(args))
    if result.skipped:
        totals = result.summary.get("output", {})
        errors = totals.get("rows", 0) - totals.get("status", {}).get("ok", 0)
        again = "no error rows"
        if errors:
            plural = errors != 1
            again = f"{errors:,} error row{'s' * plural}: pass --retry-errors to run {'them' if plural else 'it'} again"
        print(f"already complete: {result.output} (every manifest row is done; {again})")
        print(f"  report: {report_command(result.output)}")
        return 0
    _print_summary(result.output, result.summary)
    return 0 if result.succeeded else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from qwenbatch.demo import demo_config, prepare
    from qwenbatch.pipeline import run

    folder = prepare(args.dir or tempfile.mkdtemp(prefix="qwenbatch-demo-"), count=args.images)
    print(f"demo folder: {folder} (tiny random-weight model: its text is noise, the pipeline is real)", flush=True)
    quiet_ray(args.verbose)
    code = 0
    for task in ("caption", "vqa", "document"):
        result = run(demo_config(folder, task), force=True, progress=_progress(args))
        _print_summary(result.output, result.summary)
        code = code or (0 if result.succeeded else 1)
    return code


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers of at least 1, got {text!r}")
    return values


def _host_ms(text: str) -> tuple[float, float]:
    try:
        eager, compiled = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers, EAGER,COMPILED, got {text!r}") from None
    if eager < 0 or compiled < 0:
        raise argparse.ArgumentTypeError(f"expected milliseconds of at least 0, got {text!r}")
    return eager, compiled


def cmd_bench(args: argparse.Namespace) -> int:
    from qwenbatch.bench import markdown, run_bench

    folder = Path(args.dir or tempfile.mkdtemp(prefix="qwenbatch-bench-"))
    if args.mode == "scale":
        from qwenbatch.bench.scale import bench_from_args

        return bench_from_args(folder, args)
    results = run_bench(
        args.mode,
        folder,
        images=args.images,
        model=args.model,
        max_pixels=args.max_pixels,
        slowdown=args.slowdown,
        tiny_model=args.tiny,
        host_ms=args.host_ms,
        **({"layers": args.layers} if args.layers else {}),
        **({"devices": tuple(args.devices.split(","))} if args.devices else {}),
    )
    print(markdown(results))
    print(f"written: {folder / 'bench.json'} and {folder / 'bench.md'}")
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    from qwenbatch import storage
    from qwenbatch.manifest import write_manifest

    storage.configure(StorageConfig(endpoint_url=args.endpoint_url))
    table = write_manifest(args.folder, args.output)
    print(f"{table.num_rows} images, {sum(table.column('size').to_pylist())} bytes: {args.output}")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from qwenbatch.tiny import build_tiny_model

    print(build_tiny_model(args.path, seed=args.seed, thinking=args.thinking))
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    print(json.dumps(_job_config(args).model_dump(mode="json"), indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from qwenbatch.status import FAILED, PARTIAL, NoRunError, format_status, read_status

    try:
        status = read_status(args.output)
    except NoRunError as exc:
        print(f"qwenbatch: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(status.as_dict(), indent=2) if args.json else format_status(status))
    return 1 if status.state in (FAILED, PARTIAL) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from qwenbatch import storage
    from qwenbatch.report import write_report
    from qwenbatch.status import NoRunError

    storage.configure(StorageConfig(endpoint_url=args.endpoint_url))
    try:
        chosen = {name: getattr(args, name) for name in ("sample", "failed", "seed") if getattr(args, name) is not None}
        size = write_report(args.output, args.out, **chosen)
    except NoRunError as exc:
        print(f"qwenbatch: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {args.out} ({size / 1e6:.2f} MB)")
    return 0


def _console_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--verbose", action="store_true", help="Ray as it is: its operator table, execution logs and loading bars"
    )
    command.add_argument(
        "--progress-every",
        type=float,
        default=DEFAULT_EVERY_S,
        metavar="SECONDS",
        help="without a terminal: a progress line this often (in a terminal: one bar)",
    )


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="qwenbatch", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = root.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job on the current Ray cluster (or a local one)")
    run.add_argument("config", help=CONFIG_HELP)
    run.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    run.add_argument(
        "--force", action="store_true", help="run even when the output is complete (a new summary; rows done stay)"
    )
    run.add_argument(
        "--retry-errors",
        nargs="?",
        const="all",
        metavar="STATUSES",
        help="run the rows whose output row is an error again, each new row replacing its old one; "
        "optionally only some statuses: --retry-errors=load_error,infer_error",
    )
    run.add_argument(
        "--max-error-rate",
        type=float,
        default=None,
        metavar="SHARE",
        help="the run fails (exit 1) when more than this share of the output's rows are errors "
        "(output.max_error_rate, default 0.5; 1: never)",
    )
    run.add_argument("--date", help=DATE_HELP)
    _console_options(run)
    run.set_defaults(func=cmd_run)

    show = sub.add_parser("config", help="print the validated config with every default filled in")
    show.add_argument("config", help=CONFIG_HELP)
    show.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    show.add_argument("--date", help=DATE_HELP)
    show.set_defaults(func=cmd_show_config)

    status = sub.add_parser("status", help="print an output's run state, rows by status, errors and throughput")
    status.add_argument("output", help="the job's output.path")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_status)

    report = sub.add_parser("report", help="write one self-contained HTML page: summary, plots, thumbnails")
    report.add_argument("output", help="the job's output.path (a folder or an s3:// or gs:// prefix)")
    report.add_argument("--out", default="report.html", help="the HTML file to write: a path or URI")
    report.add_argument("--sample", type=int, help="how many ok rows the contact sheet shows at most")
    report.add_argument("--failed", type=int, help="how many failed rows it shows at most")
    report.add_argument("--seed", type=int, help="which rows the seeded sample draws")
    report.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    report.set_defaults(func=cmd_report)

    demo = sub.add_parser(
        "demo", help="build a tiny model, sample images and PDFs, run caption, vqa and document locally"
    )
    demo.add_argument("--dir", help="folder for the model, images and output (default: a new temporary folder)")
    demo.add_argument("--images", type=int, default=48, help="how many sample images to make (default: %(default)s)")
    _console_options(demo)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="qwenbatch against the plain transformers loop on the same images")
    bench.add_argument(
        "--mode",
        choices=["cpu", "gpu", "sim", "host", "scale"],
        default="cpu",
        help="cpu: tiny model vs the plain loop; gpu: the 8B shape on a GPU; sim: the pipeline on a simulated H100; "
        "host: the host time of a decode step, eager and compiled; scale: the job's own machinery at many rows",
    )
    bench.add_argument("--dir", help="folder for images, models and results (default: a new temporary folder)")
    bench.add_argument(
        "--images", type=int, default=None, help="default: 1000 (cpu), 384 (gpu), 640 (sim), 20000 (scale)"
    )
    bench.add_argument("--model", default=None, help="a checkpoint instead of the built one (gpu: random 8B shape)")
    bench.add_argument("--max-pixels", type=int, default=None, help="pixel budget (default: the job default)")
    bench.add_argument(
        "--tiny",
        action="store_true",
        help="gpu: the same steps with the tiny model (on CPU without a GPU): a smoke test",
    )
    bench.add_argument(
        "--slowdown", type=float, default=1.0, help="sim: stretch the simulated GPU's time (2: half an H100's speed)"
    )
    bench.add_argument(
        "--layers",
        type=_int_list,
        default=None,
        help="host: text layers of the tiny-width models timed, comma-separated (default: 2,36; 36 is the 8B's)",
    )
    bench.add_argument(
        "--devices",
        choices=["cpu", "cuda", "cpu,cuda"],
        default=None,
        help="host: where to time it (default: cpu,cuda; cuda only where there is a GPU)",
    )
    bench.add_argument(
        "--host-ms",
        type=_host_ms,
        default=None,
        metavar="EAGER,COMPILED",
        help="sim: the host's ms per decode step, eager and compiled (default: measured first with --mode host's "
        "steps at 36 layers, about two minutes on 2 cores)",
    )
    bench.add_argument("--done", help="scale: done rows to resume over, comma-separated (default 1M,5M,10M)")
    bench.add_argument("--manifest-rows", type=int, help="scale: rows of the manifest whose ids are checked (10M)")
    bench.add_argument("--lock", type=Path, help="scale: hold an exclusive flock on this file while timing a case")
    bench.set_defaults(func=cmd_bench)

    manifest = sub.add_parser("manifest", help="write a manifest (id, image, size) for a folder of images")
    manifest.add_argument("folder", help="a local folder or an s3:// or gs:// prefix, walked at any depth")
    manifest.add_argument("output", help="the manifest to write: a .parquet path or URI")
    manifest.add_argument("--endpoint-url", help="S3-compatible endpoint (default: AWS_ENDPOINT_URL)")
    manifest.set_defaults(func=cmd_manifest)

    tiny = sub.add_parser("tiny-model", help="build and save the tiny random-weight Qwen3-VL checkpoint")
    tiny.add_argument("path", help="the folder to save it in, for model.name")
    tiny.add_argument("--seed", type=int, default=0, help="seed of its random weights: one seed, one model")
    tiny.add_argument("--thinking", action="store_true", help="the Thinking variant: reasoning, </think>, answer")
    tiny.set_defaults(func=cmd_tiny_model)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    handler = ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ManifestError) as exc:
        print(f"qwenbatch: error: {exc}", file=sys.stderr)
        return 2
    except (LeaseHeld, LeaseLost) as exc:  # another run writes this output
        print(f"qwenbatch: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
