"""Job configuration: YAML validated into typed config, every field overridable."""

from __future__ import annotations

import difflib
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qwenbatch import schema


class ConfigError(ValueError):
    """A configuration problem, reported as one line before any work starts."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(min_length=1, description="hub id or local checkpoint path")
    revision: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = "sdpa"
    engine: Literal["transformers", "vllm"] = Field(
        default="transformers", description="transformers (the reference) or vllm (pip install 'qwenbatch[vllm]')"
    )
    gpu_memory_utilization: float = Field(
        default=schema.DEFAULT_GPU_MEMORY_UTILIZATION,
        gt=0,
        le=1,
        description="vllm: share of each GPU's memory the engine takes (on CPU: of the machine's memory)",
    )
    kv_cache_gib: float | None = Field(
        default=None, gt=0, description="vllm: KV cache of this size instead of the share above (CPU: set it)"
    )
    max_model_len: int | None = Field(
        default=None, ge=1, description="vllm: tokens of context; a longer prompt is that row's infer_error"
    )
    max_num_seqs: int = Field(
        default=schema.VLLM_MAX_NUM_SEQS,
        ge=1,
        description="vllm: requests the engine runs at once; each replica keeps 1.1x that many in the engine",
    )

    @field_validator("engine")
    @classmethod
    def _vllm_installed(cls, value: str) -> str:
        if value == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ValueError("engine 'vllm' needs vLLM installed beside qwenbatch (docs/vllm.md)")
        return value

    @field_validator("attn_implementation")
    @classmethod
    def _flash_attention_installed(cls, value: str | None) -> str | None:
        if value == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("flash_attention_2 needs the flash-attn package (pip install flash-attn); use sdpa")
        return value

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        """`model: Qwen/Qwen3-VL-8B-Instruct` is shorthand for `model: {name: ...}`."""
        return {"name": value} if isinstance(value, str) else value


class TaskConfig(_Section):
    kind: Literal["caption", "vqa", "document", "custom"] = "caption"
    prompt: str | None = Field(
        default=None,
        description="caption/document: the instruction; custom: a template with {column} placeholders",
    )
    system: str | None = None
    question_column: str = schema.QUESTION
    prompt_column: str = schema.PROMPT
    output: Literal["text", "json"] = Field(
        default="text", description="json: the answer is also parsed, validated and written to the `json` column"
    )
    json_schema: dict[str, Any] | None = Field(
        default=None, description="output json: a JSON Schema the answer must match, inline or a .json file's path"
    )

    @model_validator(mode="after")
    def _consistent(self) -> TaskConfig:
        """custom needs its template; a schema needs JSON output."""
        if self.kind == "custom" and not self.prompt:
            raise ValueError("task.kind 'custom' needs task.prompt, a template such as 'Is there a {object}?'")
        if self.json_schema is not None and self.output != "json":
            raise ValueError("task.json_schema needs task.output 'json'")
        return self

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_from_file(cls, value: Any) -> Any:
        """A path is read here, once, on the driver: the validated config (and the run summary) holds the schema."""
        if not isinstance(value, str):
            return value
        try:
            return json.loads(Path(value).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read the schema file {value}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"the schema file {value} is not JSON: {exc}") from None

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from jsonschema import SchemaError, validators

            try:
                validators.validator_for(value).check_schema(value)
            except SchemaError as exc:
                raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        return value

    def instruction(self) -> str | None:
        return self.prompt if self.prompt is not None else schema.DEFAULT_PROMPTS.get(self.kind)


class GenerationConfig(_Section):
    max_new_tokens: int = Field(default=128, ge=1, le=32768)
    min_new_tokens: int = Field(default=0, ge=0)
    do_sample: bool = False
    temperature: float = Field(default=0.7, gt=0)
    top_p: float = Field(default=0.8, gt=0, le=1)
    top_k: int = Field(default=20, ge=0)
    seed: int = 0
    compile: Literal["auto"] | bool = Field(
        default="auto",
        description="static KV cache and a compiled decode step, replayed as CUDA graphs on a GPU (batches padded "
        "to a few shapes); auto: on for a CUDA replica of the transformers engine, off on CPU and with vLLM",
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> GenerationConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("generation.min_new_tokens must not exceed generation.max_new_tokens")
        return self

    def compiles_on(self, device: str) -> bool:
        """Whether a transformers replica on `device` ("cuda", "cpu", ...) compiles its decode step."""
        return self.compile is True or (self.compile == "auto" and device == "cuda")


class ImageConfig(_Section):
    min_pixels: int = Field(default=schema.DEFAULT_MIN_PIXELS, ge=schema.PIXELS_PER_TOKEN)
    max_pixels: int | None = Field(
        default=None, ge=schema.PIXELS_PER_TOKEN, description="default: per task (document gets more)"
    )
    max_bytes: int = Field(default=schema.DEFAULT_MAX_BYTES, ge=1)
    max_source_pixels: int = Field(default=schema.DEFAULT_MAX_SOURCE_PIXELS, ge=1)
    formats: tuple[str, ...] = schema.DEFAULT_FORMATS
    fetch_timeout_s: float = Field(default=schema.DEFAULT_FETCH_TIMEOUT_S, gt=0)
    fetch_retries: int = Field(default=schema.DEFAULT_FETCH_RETRIES, ge=0, description="after a transient error")
    fetch_backoff_s: float = Field(default=schema.DEFAULT_FETCH_BACKOFF_S, ge=0, description="first retry's wait")
    max_redirects: int = Field(default=schema.DEFAULT_MAX_REDIRECTS, ge=0)
    allow_private_network: bool = Field(
        default=False, description="let http(s) images come from private, loopback and link-local addresses"
    )
    allowed_prefixes: tuple[str, ...] | None = Field(
        default=None,
        description="paths or URI prefixes rows may point to; null: the folders the manifests live in, and below",
    )
    max_total_pixels: int = Field(
        default=schema.DEFAULT_MAX_TOTAL_PIXELS,
        ge=schema.PIXELS_PER_TOKEN,
        description="a row of several images (the images column, a PDF per_document): their pixels together; "
        "each image's budget is min(max_pixels, max_total_pixels / images)",
    )
    jpeg_draft: bool = Field(
        default=False,
        description="decode large JPEGs at reduced size (DCT scaling) when the target is at most half: "
        "several times faster, pixels differ slightly from a full decode",
    )

    @field_validator("formats")
    @classmethod
    def _upper(cls, formats: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(f.upper() for f in formats)


class InputConfig(_Section):
    path: str | list[str] = Field(description="Parquet manifest: a file, a folder, a glob, or a list of them")
    id_column: str = schema.ID
    image_column: str = schema.IMAGE
    images_column: str = Field(default=schema.IMAGES, description="a list of images per row: one prompt over all")
    format: Literal["parquet", "webdataset", "hf"] = Field(
        default="parquet", description="parquet manifests, WebDataset tars, or a Hugging Face dataset"
    )
    hf_builder: str | None = Field(
        default=None, description="hf: a `load_dataset` builder (imagefolder, parquet); null: a save_to_disk folder"
    )
    hf_split: str = schema.DEFAULT_HF_SPLIT

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


class OutputConfig(_Section):
    path: str
    shard_rows: int = Field(default=schema.DEFAULT_SHARD_ROWS, ge=1, description="a shard is written at this many rows")
    shard_mb: int = Field(default=schema.DEFAULT_SHARD_MB, ge=1, description="... or at this many MiB (in memory)")
    shard_seconds: float = Field(
        default=schema.DEFAULT_SHARD_SECONDS,
        gt=0,
        le=86_400,
        description="... or when its first row has waited this long (the first shard of a run: 30 s at most)",
    )
    max_error_rate: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="a run ends failed (exit 1, no _SUCCESS) when more than this share of the output's rows are "
        "errors: a configuration problem, not a few bad images; 1: never",
    )


class PdfConfig(_Section):
    """PDFs in the image column: which pages, how many at most, and a row per page or per document."""

    pages: Literal["all", "first"] | list[int] = Field(default="all", description="all, first, or page numbers")
    max_pages: int = Field(
        default=schema.DEFAULT_PDF_MAX_PAGES,
        ge=1,
        description="per_page: pages past this are one error row; per_document: a longer document is an error row",
    )
    mode: Literal["per_page", "per_document"] = Field(
        default="per_page", description="a row per page, or one prompt over all of a document's pages"
    )

    @field_validator("pages")
    @classmethod
    def _page_numbers(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value or any(number < 1 for number in value):
                raise ValueError("page numbers are 1-based and the list must not be empty")
            return sorted(set(value))
        return value


class StorageConfig(_Section):
    """Object-store client settings. No credentials here: the config is saved in the run summary,
    so keys come from each process's environment (AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)  # hashable: it keys the per-process client cache

    endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint; default: AWS_ENDPOINT_URL")
    region: str | None = Field(default=None, description="S3 region; default: AWS_REGION or AWS_DEFAULT_REGION")
    anonymous: bool = Field(default=False, description="unsigned requests, for public buckets")


class RunConfig(_Section):
    batch_size: int = Field(default=schema.DEFAULT_BATCH_SIZE, ge=1, description="rows per generate call, at most")
    max_batch_tokens: int | None = Field(
        default=None,
        ge=schema.MIN_BATCH_TOKEN_BUDGET,
        description="rows x the longest row's image tokens, per generate call: similar sizes batch together; "
        f"null: from the GPU memory free after the model loads (on CPU {schema.DEFAULT_MAX_BATCH_TOKENS})",
    )
    gpus_per_replica: int = Field(default=1, ge=1)
    replicas: int | tuple[int, int] = Field(default=1, description="a fixed count, or [min, max] to autoscale")
    cpu_concurrency: int | None = Field(
        default=None, ge=1, description="load actors at most; default: the cluster's CPUs the replicas leave free"
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    load_memory_mb: int | None = Field(
        default=schema.DEFAULT_LOAD_MEMORY_MB,
        ge=64,
        description="private memory each load actor may take beyond what it holds once started; an image whose "
        "decode needs more is that row's load_error instead of the actor's death; null: no limit",
    )
    lease_timeout_s: float = Field(
        default=schema.DEFAULT_LEASE_TIMEOUT_S,
        gt=0,
        description="a run's lease on its output not renewed for this long is taken over by the next run",
    )
    processor_device: Literal["cpu", "cuda"] = Field(
        default="cpu",
        description="where a replica normalises and patchifies its images: cuda runs the processor's torchvision "
        "backend on the replica's GPU (GPU replicas only)",
    )

    @model_validator(mode="after")
    def _processor_on_a_gpu(self) -> RunConfig:
        if self.processor_device == "cuda" and self.device == "cpu":
            raise ValueError("run.processor_device 'cuda' needs the replicas on GPUs, and run.device is 'cpu'")
        return self

    @field_validator("replicas", mode="before")
    @classmethod
    def _parse_range(cls, value: Any) -> Any:
        """Accept `2`, `[1, 4]` and the command-line friendly `1-4`."""
        if isinstance(value, str) and "-" in value:
            low, _, high = value.partition("-")
            return (low.strip(), high.strip())
        return value

    @field_validator("replicas")
    @classmethod
    def _positive(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or high < low:
            raise ValueError("replicas must be >= 1, and a range must be [min, max] with min <= max")
        return value


class ProcessConfig(_Section):
    """What the stages need: `qwenbatch.process` takes this; a job adds where rows come from and go."""

    model: ModelConfig
    task: TaskConfig = TaskConfig()
    generation: GenerationConfig = GenerationConfig()
    image: ImageConfig = ImageConfig()
    run: RunConfig = RunConfig()
    storage: StorageConfig = StorageConfig()
    pdf: PdfConfig = PdfConfig()

    def max_pixels(self) -> int:
        if self.image.max_pixels is not None:
            return self.image.max_pixels
        return schema.DOCUMENT_MAX_PIXELS if self.task.kind == "document" else schema.DEFAULT_MAX_PIXELS

    @model_validator(mode="after")
    def _budget_order(self) -> ProcessConfig:
        if self.image.min_pixels > self.max_pixels():
            raise ValueError("image.min_pixels must not exceed image.max_pixels")
        return self

    @model_validator(mode="after")
    def _vllm_settings(self) -> ProcessConfig:
        """Settings of the transformers engine that vLLM replaces with its own, or that it does not take."""
        if self.model.engine == "vllm" and self.generation.compile is True:  # auto: off, vLLM compiles by itself
            raise ValueError("generation.compile is the transformers engine's; vLLM compiles on GPUs by itself")
        if self.model.engine == "vllm" and self.run.processor_device == "cuda":
            raise ValueError("run.processor_device 'cuda' is the transformers engine's; vLLM places its own")
        if self.model.engine == "vllm" and self.pdf.mode == "per_document":
            raise ValueError(schema.VLLM_ONE_IMAGE)
        return self


class JobConfig(ProcessConfig):
    input: InputConfig
    output: OutputConfig


def _keys_at(model: type[BaseModel], section: tuple[int | str, ...]) -> list[str]:
    """The keys the section at `section` takes (none where that is no section)."""
    for part in section:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _one_line(error: ValidationError, model: type[BaseModel]) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        *section, name = first["loc"]
        close = difflib.get_close_matches(str(name), _keys_at(model, tuple(section)), n=1)
        return f"{key}: unknown key" + (f"; did you mean {'.'.join(map(str, [*section, close[0]]))}?" if close else "")
    if first["type"] == "missing":
        return f"{key}: required key is missing"
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"{key}: {message}{more}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`run.batch_size=4` -> (["run", "batch_size"], 4); the value is read as a YAML scalar."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if isinstance(child, str) and key == "model":
                child = {"name": child}
            if child is None:
                child = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {key} is not a section")
            node[key] = child
            node = child
        node[keys[-1]] = value
    return data


def read_config(path: str | Path) -> dict[str, Any]:
    """A YAML config file as data; a ConfigError with a one-line message if it cannot be read."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections, got {type(loaded).__name__}")
    return loaded or {}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Read, override and validate; every failure is a ConfigError with a one-line message."""
    data = read_config(path) if path is not None else {}
    data = apply_overrides(data, overrides or [])
    try:
        return JobConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path or 'config'}: {_one_line(exc, JobConfig)}") from None


def load_process_config(source: ProcessConfig | Mapping[str, Any] | str | Path) -> ProcessConfig:
    """The stages' config from a config object, a dict or a YAML path. A job's `input` and `output`
    sections are dropped: `process` reads and writes nothing of its own."""
    if isinstance(source, ProcessConfig):
        data = source.model_dump(exclude={"input", "output"})
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        data = read_config(source)
    data = {key: value for key, value in data.items() if key not in ("input", "output")}
    try:
        return ProcessConfig.model_validate(data)
    except ValidationError as exc:
        where = source if isinstance(source, str | Path) else "config"
        raise ConfigError(f"{where}: {_one_line(exc, ProcessConfig)}") from None


def config_snapshot(config: JobConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")
