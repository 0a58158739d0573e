"""Column names, statuses, defaults and limits: the one place each of these facts lives."""

from __future__ import annotations

import pyarrow as pa

# Input columns (the id and image column names are configurable; these are the defaults).
ID = "id"
IMAGE = "image"
IMAGE_BYTES = "image_bytes"
PROMPT = "prompt"
QUESTION = "question"
IMAGES = "images"  # a list of locations or encoded images: one prompt over all of them, in order

# Output columns added to every row.
TEXT = "text"
JSON = "json"  # task.output json: the answer parsed, validated and normalised
PAGE = "page"  # a PDF page's number, 1-based; null for any other row
REASONING = "reasoning"
STATUS = "status"
ERROR = "error"
WIDTH = "width"
HEIGHT = "height"
IMAGE_TOKENS = "image_tokens"
INPUT_TOKENS = "input_tokens"
OUTPUT_TOKENS = "output_tokens"
FINISH_REASON = "finish_reason"
MODEL = "model"
TASK = "task"
RUN_ID = "run_id"

OUTPUT_FIELDS: tuple[pa.Field, ...] = (
    pa.field(TEXT, pa.string()),
    pa.field(JSON, pa.string()),
    pa.field(REASONING, pa.string()),
    pa.field(STATUS, pa.string()),
    pa.field(ERROR, pa.string()),
    pa.field(PAGE, pa.int32()),
    pa.field(WIDTH, pa.int32()),
    pa.field(HEIGHT, pa.int32()),
    pa.field(IMAGE_TOKENS, pa.int32()),
    pa.field(INPUT_TOKENS, pa.int32()),
    pa.field(OUTPUT_TOKENS, pa.int32()),
    pa.field(FINISH_REASON, pa.string()),
    pa.field(MODEL, pa.string()),
    pa.field(TASK, pa.string()),
    pa.field(RUN_ID, pa.string()),
)
OUTPUT_COLUMNS: tuple[str, ...] = tuple(f.name for f in OUTPUT_FIELDS)

# Internal columns that travel between stages and never reach the output.
PIXELS = "_pixels"  # resized RGB uint8, row-major HxWx3, as bytes
CHAT = "_chat"  # the chat-templated prompt text
SIZES = "_sizes"  # a row of several images: each one's width and height in turn, their pixels one after another
DOCUMENT = "_document"  # a PDF page row: its document's id ...
DOCUMENT_ROWS = "_document_rows"  # ... and how many rows the document became: they are written in one shard
DROPPED_COLUMNS: tuple[str, ...] = (IMAGE_BYTES, PIXELS, CHAT, SIZES, DOCUMENT, DOCUMENT_ROWS)

# Statuses: `ok`, or the stage that failed.
OK = "ok"
LOAD_ERROR = "load_error"
PROMPT_ERROR = "prompt_error"
INFER_ERROR = "infer_error"
PARSE_ERROR = "parse_error"  # task.output json: the answer does not parse or does not match the schema
STATUSES = (OK, LOAD_ERROR, PROMPT_ERROR, INFER_ERROR, PARSE_ERROR)
ERROR_STATUSES = STATUSES[1:]  # what `qwenbatch run --retry-errors` runs again

FINISH_STOP = "stop"
FINISH_LENGTH = "length"

TASKS = ("caption", "vqa", "document", "custom")
OUTPUTS = ("text", "json")  # task.output: the answer as text, or also parsed as JSON

# One visual token per (patch_size * merge_size)^2 pixels: 32x32 for Qwen3-VL.
PIXELS_PER_TOKEN = 32 * 32

# Pixel budget defaults, in pixels of the resized image. The checkpoint allows 16384
# tokens; a 12 MP photo would become ~11,750 tokens, so the default cap is far lower.
DEFAULT_MIN_PIXELS = 64 * PIXELS_PER_TOKEN
DEFAULT_MAX_PIXELS = 1280 * PIXELS_PER_TOKEN
DOCUMENT_MAX_PIXELS = 4096 * PIXELS_PER_TOKEN

DEFAULT_PROMPTS = {
    "caption": "Describe this image in one or two sentences.",
    "document": (
        "Read this document. Transcribe its important text and summarize what the "
        "document is, its key fields and figures."
    ),
}

# Load-stage limits.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_SOURCE_PIXELS = 100_000_000  # decoded size from the header; bombs stop here
PDF_FORMAT = "PDF"
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", PDF_FORMAT)
DEFAULT_FETCH_TIMEOUT_S = 30.0
DEFAULT_FETCH_RETRIES = 3  # after the first attempt, on transient errors only (5xx, 429, timeouts, resets)
DEFAULT_FETCH_BACKOFF_S = 0.5  # the first retry's wait; it doubles, with jitter, up to the cap
FETCH_BACKOFF_MAX_S = 10.0
DEFAULT_MAX_REDIRECTS = 5
FETCH_CHUNK_BYTES = 256 * 1024
# Private memory (heap, anonymous mappings: RLIMIT_DATA) a load actor may take beyond what it holds once
# started; Ray's shared object store does not count. A decode that needs more is that row's load_error.
DEFAULT_LOAD_MEMORY_MB = 4096
# A row of several images (the `images` column, a PDF with pdf.mode per_document): their pixels together at
# most this (the checkpoint's own cap, 16384 visual tokens); each image's budget shrinks to fit.
DEFAULT_MAX_TOTAL_PIXELS = 16384 * PIXELS_PER_TOKEN

# PDFs: one output row per page, its id the document's id, this separator and the page number (`inv-7#p2`).
PAGE_ID_SEPARATOR = "#p"
PDF_PAGES = ("all", "first")  # pdf.pages: every page, the first, or a list of page numbers
PDF_MODES = ("per_page", "per_document")  # a row per page, or one prompt over a document's pages
DEFAULT_PDF_MAX_PAGES = 100
PDF_HEADER_WITHIN = 1024  # PDF readers accept the `%PDF-` header anywhere in the first 1024 bytes

# Input kinds beyond Parquet manifests.
# What counts as an image file (a PDF's pages too).
MANIFEST_ROOT_KEY = b"qwenbatch.root"  # a manifest's Parquet metadata: the folder `qwenbatch manifest` walked
LOCATION_SAMPLE_ROWS = 1_000  # rows whose locations are checked against image.allowed_prefixes before a run
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".pdf")
SIZE = "size"  # `qwenbatch manifest`: the image file's bytes
SHARD = "shard"  # WebDataset: the tar a sample came from
WEBDATASET_TEXT_SUFFIXES = ("txt", "json")  # sibling members that become string columns; others are ignored
DEFAULT_HF_SPLIT = "train"
MAX_ERROR_CHARS = 500

# Nightly runs: `{date}` in a path renders as this format (`{date:%Y/%m/%d}` picks another).
DATE_FORMAT = "%Y-%m-%d"

# model.engine 'vllm': the share of each GPU's memory vLLM takes by default (vLLM's own default).
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9

# Batching in the infer stage: rows per generate call, and rows x longest row in image tokens.
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_BATCH_TOKENS = 32768  # on CPU, and on a GPU where the config sets none: see GPU_MEMORY_HEADROOM
MIN_BATCH_TOKEN_BUDGET = 64
# On a GPU with `run.max_batch_tokens` unset, the budget comes from the memory free after the model
# loads: this share of it stays for activations, fragmentation and the prepared batches
# (PREFETCH_BATCHES), the rest holds the KV cache, and each row's cache also holds its text (about
# this many tokens) and its new tokens.
GPU_MEMORY_HEADROOM = 0.25
PROMPT_TEXT_ALLOWANCE = 128
# The infer stage takes this many batches' rows at a time and groups them by image tokens: a
# window of one batch would leave nothing to group, and every batch padded to its largest image.
SORT_WINDOW_BATCHES = 4
# Batches a replica holds prepared (processor output, on the device), the one generating included:
# with 3, the prepare thread banks a whole batch ahead, so one slow preparation does not delay the
# next `generate` (simulated H100, 1024x768: gpu_busy 98.8-99.0% against 97.7-98.7% with 2, docs/performance.md).
# Each slot holds a batch's float32 pixels on the device: about 1 GB at 32 images of 1280 tokens.
PREFETCH_BATCHES = 3
# Blocks of rows Ray Data runs in one replica at once: the next block's batches are prepared while
# the last batch of the one before generates. `generate` itself runs one call at a time.
REPLICA_CONCURRENT_BLOCKS = 2
# The vLLM engine: requests it runs at once (`model.max_num_seqs`; vLLM's own default on CPUs and most
# GPUs, 1024 on an H100 or H200), and the requests a replica keeps in it, running or queued: 1.1x that,
# as Ray's `ray.data.llm` does, so a step that finishes requests finds others ready to take their place.
VLLM_MAX_NUM_SEQS = 256
VLLM_IN_FLIGHT_PER_SEQ = 1.1
# `generation.compile`: prompts are left-padded to a power of two of at least this many tokens, and
# batches to a power of two of rows, so the decode step compiles for a handful of shapes.
COMPILE_MIN_PROMPT = 64

# Starting a local Ray: a node that times out while registering is stopped (waiting this long for its
# processes to go) and started again, up to this many attempts in all.
RAY_START_ATTEMPTS = 3
RAY_START_STOP_WAIT_S = 10.0

SUMMARY_FILE = "_summary.json"
REPLICAS_FOLDER = "_replicas"  # per-run folders of per-replica busy-time files, read by status and the summary
ATTEMPTS_FOLDER = "_attempts"  # per-run folders of the blocks and rows in flight in the load and infer actors
# A row whose worker died this many times while it was processed alone gets this error, never another try.
ROW_WORKER_DEATHS = 2
WORKER_DIED_TWICE = "the worker died twice while processing this row"
# vLLM is started for one image a prompt: rows of several images are that engine's row errors.
VLLM_ONE_IMAGE = "model.engine vllm takes one image a prompt: image lists and pdf.mode per_document need transformers"
# Tests only: `<stage>:<id>[:<marker file>]`, comma-separated, makes that stage's worker die on that row
# (with a marker file, only once). See `attempts.die_if_told`.
TEST_DIE_ENV = "QWENBATCH_TEST_DIE_ON"
# Set in the environment of a vLLM replica's engine processes: what its reaper kills once the replica is gone.
VLLM_ENGINE_OF_ENV = "QWENBATCH_VLLM_ENGINE_OF"
# Tests only: the driver SIGKILLs itself when a retry reaches this step (see `retry.reached`).
TEST_KILL_ENV = "QWENBATCH_TEST_KILL_AT"
RETRY_DIR = "_retry"  # a retry run's new rows wait here, per run, until they replace the old ones
RETRY_JOURNAL = "_journal.json"  # in a run's retry folder: its rows are complete, the shards they replace
SUCCESS_FILE = "_SUCCESS"
TEMP_PREFIX = ".tmp-"  # atomic writes stage here; hidden from readers, removed at the start of a run
# One writer per output: the lease a run holds while it writes, renewed this many times per timeout;
# one not renewed for the timeout (or whose process on this host is gone) is taken over.
LEASE_FILE = "_lease.json"
DEFAULT_LEASE_TIMEOUT_S = 120.0
LEASE_RENEWALS_PER_TIMEOUT = 4
LEASE_ACQUIRE_TRIES = 3  # a lease given back or taken over between our create and read: look again

# The output's shards: a shard is written when it holds this many rows or bytes (in memory), or
# when its first row has waited this long. A run's first shard goes out with its first finished
# rows (the run shows at once), the second waits at most SECOND_SHARD_S, each later one twice as
# long as the one before, up to the limit: early shards land soon, a long run settles at large ones.
DEFAULT_SHARD_ROWS = 1_000_000
DEFAULT_SHARD_MB = 64
DEFAULT_SHARD_SECONDS = 300.0
SECOND_SHARD_S = 30.0
INDEX_DIR = "_index"  # beside the shards: each shard's id hashes and stats, under the shard's own name
INDEX_HI, INDEX_LO = "hi", "lo"  # the index's columns: an id's 128-bit hash as two uint64 words
STATS_KEY = b"qwenbatch.stats"  # the index file's metadata key holding the shard's stats, as JSON
INDEX_ROW_GROUP = 65_536  # rows per row group of an index: a hash range reads only its row groups
STATS_ERRORS_KEPT = 100  # distinct error messages a shard's stats keep, the most common first
STATS_REASONS_KEPT = 1_000  # distinct error reasons (paths and numbers masked) a shard's stats keep

# Ids compared as hashes, in parts of at most this many ids held in memory at once (16 bytes per
# hash, 24 with its row number); larger manifests and outputs are split by hash and sorted part by part.
ID_PART_ROWS = 4_000_000

# Reading the input: rows per block grow with the rows to process, between these bounds, and a block
# of decoded images stays under LOAD_BLOCK_BYTES at the pixel budget: below Ray Data's 128 MiB
# target_max_block_size, which would otherwise cut a load block into uneven pieces.
MIN_BLOCK_ROWS = 16
MAX_BLOCK_ROWS = 1_024
LOAD_BLOCK_BYTES = 96 * 1024 * 1024
BLOCKS_PER_WORKER = 4  # blocks per load worker at least: enough to share the work and stream it
