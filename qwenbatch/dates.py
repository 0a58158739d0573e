"""Date templates in input and output paths, so one nightly command covers each day's partition.

`{date}` becomes `2026-11-25`; `{date:%Y/%m/%d}` takes any strftime format. Nothing else in a
path is touched (no `str.format`), so other braces in a URI stay as they are.
"""

from __future__ import annotations

import re
from datetime import date, timedelta

from qwenbatch import schema
from qwenbatch.config import ConfigError, JobConfig

_TEMPLATE = re.compile(r"\{date(?::([^{}]+))?\}")
_RELATIVE = {"today": 0, "yesterday": -1}


def parse_date(text: str | None, today: date | None = None) -> date:
    """`YYYY-MM-DD`, `today` or `yesterday` (local date); None means today."""
    today = today or date.today()
    text = (text or "today").strip().lower()
    if text in _RELATIVE:
        return today + timedelta(days=_RELATIVE[text])
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--date {text!r}: expected YYYY-MM-DD, 'today' or 'yesterday'") from None


def render(path: str, day: date) -> str:
    """Replace every `{date}` / `{date:FORMAT}` in one path."""
    return _TEMPLATE.sub(lambda match: day.strftime(match.group(1) or schema.DATE_FORMAT), path)


def with_date(config: JobConfig, day: date) -> JobConfig:
    """The config with its input and output paths rendered for `day`; other fields unchanged."""
    source = config.input.path
    paths = render(source, day) if isinstance(source, str) else [render(p, day) for p in source]
    return config.model_copy(
        update={
            "input": config.input.model_copy(update={"path": paths}),
            "output": config.output.model_copy(update={"path": render(config.output.path, day)}),
        }
    )
