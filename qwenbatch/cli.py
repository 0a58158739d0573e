"""The `qwenbatch` command: thin over the library calls."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence

from qwenbatch.config import ConfigError, JobConfig, load_config
from qwenbatch.read import ManifestError

log = logging.getLogger("qwenbatch")

DATE_HELP = "the day {date} and {date:%%Y/%%m/%%d} in input.path and output.path become: YYYY-MM-DD, today, yesterday"


def _print_summary(output: str, summary: dict) -> None:
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


def _job_config(args: argparse.Namespace) -> JobConfig:
    """The validated config with `--date` rendered into its paths, after the overrides."""
    from qwenbatch.dates import parse_date, with_date

    return with_date(load_config(args.config, args.overrides), parse_date(args.date))


def cmd_run(args: argparse.Namespace) -> int:
    from qwenbatch.pipeline import run

    config = _job_config(args)
    result = run(config, force=args.force, max_error_rate=args.max_error_rate)
    if result.skipped:
        print(f"already complete: {result.output} (pass --force to run it again)")
        return 0
    _print_summary(result.output, result.summary)
    return 0 if result.succeeded else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from qwenbatch.demo import demo_config, prepare
    from qwenbatch.pipeline import run

    folder = prepare(args.dir or tempfile.mkdtemp(prefix="qwenbatch-demo-"), count=args.images)
    print(f"demo folder: {folder} (tiny random-weight model: its text is noise, the pipeline is real)")
    code = 0
    for task in ("caption", "vqa"):
        result = run(demo_config(folder, task), force=True)
        _print_summary(result.output, result.summary)
        code = code or (0 if result.succeeded else 1)
    return code


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from qwenbatch.tiny import build_tiny_model

    print(build_tiny_model(args.path, seed=args.seed))
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


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="qwenbatch", description=__doc__)
    sub = root.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job on the current Ray cluster (or a local one)")
    run.add_argument("config", help="YAML job config")
    run.add_argument("overrides", nargs="*", help="key.path=value, e.g. run.batch_size=4")
    run.add_argument("--force", action="store_true", help="run even if the output is already complete")
    run.add_argument(
        "--max-error-rate", type=float, default=None, help="exit non-zero when more than this share of rows failed"
    )
    run.add_argument("--date", help=DATE_HELP)
    run.set_defaults(func=cmd_run)

    show = sub.add_parser("config", help="print the validated config with every default filled in")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    show.add_argument("--date", help=DATE_HELP)
    show.set_defaults(func=cmd_show_config)

    status = sub.add_parser("status", help="print an output's run state, rows by status, errors and throughput")
    status.add_argument("output", help="the job's output.path")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=cmd_status)

    demo = sub.add_parser("demo", help="build a tiny model and sample images, run caption and vqa locally")
    demo.add_argument("--dir", help="folder for the model, images and output (default: a new temporary folder)")
    demo.add_argument("--images", type=int, default=48)
    demo.set_defaults(func=cmd_demo)

    tiny = sub.add_parser("tiny-model", help="build and save the tiny random-weight Qwen3-VL checkpoint")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_tiny_model)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ManifestError) as exc:
        print(f"qwenbatch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
