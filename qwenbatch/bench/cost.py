"""What one `generate` call costs Qwen3-VL-8B on an H100: FLOPs, bytes, and the seconds they take.

One formula serves the simulated GPU (`bench --mode sim` sleeps this long per call) and the model
FLOP utilisation the GPU benchmark reports. It counts the work of the batch as transformers runs it:
every row padded to the batch's longest prompt, every image through the vision tower.

- Vision tower and prefill: matrix FLOPs at `PREFILL_EFFICIENCY` (50%) of the H100's 989 TFLOP/s
  dense bf16 peak.
- Each decode step: the larger of the bytes it must read (the text model's weights and the whole
  KV cache, at 3.35 TB/s) and its FLOPs at peak. Memory-bound until the batch is large. The simulated
  GPU also takes the host's time per step where that is larger (eager decoding: `bench.host`).

For a 1024x768 image (3,072 patches, 768 visual tokens), a ~790-token prompt and 128 new tokens
this gives about 4.0 TFLOP of vision, 11.2 TFLOP of prefill and 1.9 TFLOP of decode (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from qwenbatch.bench.shape import QWEN3_VL_8B_PARAMS

H100_BF16_DENSE_FLOPS = 989e12  # peak dense bf16 tensor FLOP/s, H100 SXM (the H200 has the same)
H100_MEMORY_BYTES_PER_S = 3.35e12  # HBM3 bandwidth, H100 SXM
PREFILL_EFFICIENCY = 0.5  # share of peak the vision tower and prefill reach
H100_MEMORY_BYTES = 80e9
H100_FREE_AFTER_LOAD = H100_MEMORY_BYTES - QWEN3_VL_8B_PARAMS * 2 - 2e9  # after the bf16 weights and CUDA context
BF16_BYTES = 2

# Qwen3-VL-8B-Instruct (config.json): text model
TEXT_LAYERS = 36
TEXT_HIDDEN = 4096
TEXT_INTERMEDIATE = 12288  # gated MLP: gate, up and down projections
TEXT_HEADS = 32
TEXT_KV_HEADS = 8
HEAD_DIM = 128
VOCAB = 151936
# vision tower
VISION_DEPTH = 27
VISION_HIDDEN = 1152
VISION_INTERMEDIATE = 4304  # plain MLP: fc1 and fc2
PATCH_INPUT = 3 * 2 * 16 * 16  # channels x temporal patch x 16 x 16 pixels
MERGE = 2 * 2  # patches per visual token
MERGERS = 4  # the output merger and the three deepstack mergers

TEXT_LAYER_PARAMS = (
    2 * TEXT_HIDDEN * TEXT_HEADS * HEAD_DIM  # q and o
    + 2 * TEXT_HIDDEN * TEXT_KV_HEADS * HEAD_DIM  # k and v
    + 3 * TEXT_HIDDEN * TEXT_INTERMEDIATE
)
LM_HEAD_PARAMS = TEXT_HIDDEN * VOCAB
# Read by every decode step: the decoder layers and the LM head (the embedding table gives only a
# row per sequence, so it is not counted; DESIGN.md's 16.4 GB includes it).
DECODE_WEIGHT_BYTES = (TEXT_LAYERS * TEXT_LAYER_PARAMS + LM_HEAD_PARAMS) * BF16_BYTES
KV_BYTES_PER_TOKEN = 2 * TEXT_LAYERS * TEXT_KV_HEADS * HEAD_DIM * BF16_BYTES  # 144 KiB
VISION_LAYER_PARAMS = 4 * VISION_HIDDEN**2 + 2 * VISION_HIDDEN * VISION_INTERMEDIATE
MERGER_PARAMS = (MERGE * VISION_HIDDEN) ** 2 + MERGE * VISION_HIDDEN * TEXT_HIDDEN


@dataclass(frozen=True)
class BatchShape:
    """One `generate` call as the GPU runs it."""

    rows: int
    prompt_tokens: int  # the padded prompt length: every row computes it
    image_patches: tuple[int, ...]  # per image, before merging (t x h x w of its grid)
    new_tokens: int


def vision_flops(patches: int) -> float:
    """One image through the vision tower: patch embedding, 27 blocks of full attention, 4 mergers."""
    embed = 2 * patches * PATCH_INPUT * VISION_HIDDEN
    blocks = VISION_DEPTH * (2 * patches * VISION_LAYER_PARAMS + 4 * patches**2 * VISION_HIDDEN)
    mergers = MERGERS * 2 * (patches // MERGE) * MERGER_PARAMS
    return embed + blocks + mergers


def prefill_flops(rows: int, tokens: int) -> float:
    """The prompt through the text model, causal attention, and the LM head on the last position."""
    per_row = 2 * tokens * TEXT_LAYERS * TEXT_LAYER_PARAMS + 2 * tokens**2 * TEXT_HIDDEN * TEXT_LAYERS
    return rows * (per_row + 2 * LM_HEAD_PARAMS)


def decode_step_flops(rows: int, context: int) -> float:
    per_row = 2 * (TEXT_LAYERS * TEXT_LAYER_PARAMS + LM_HEAD_PARAMS) + 4 * context * TEXT_HIDDEN * TEXT_LAYERS
    return rows * per_row


def batch_flops(shape: BatchShape) -> float:
    """All the model FLOPs of one call: what model FLOP utilisation divides by time."""
    decode = sum(decode_step_flops(shape.rows, shape.prompt_tokens + step) for step in range(shape.new_tokens))
    return sum(map(vision_flops, shape.image_patches)) + prefill_flops(shape.rows, shape.prompt_tokens) + decode


def h100_seconds(shape: BatchShape, host_step_s: float = 0.0) -> float:
    """The time an H100 needs for one call, by the rules in the module docstring.

    `host_step_s`: what the host needs to issue one decode step (`bench --mode host`); a step takes the larger
    of that and its roofline time, as the GPU cannot run a step before Python has launched it.
    """
    dense = sum(map(vision_flops, shape.image_patches)) + prefill_flops(shape.rows, shape.prompt_tokens)
    seconds = dense / (PREFILL_EFFICIENCY * H100_BF16_DENSE_FLOPS)
    for step in range(shape.new_tokens):
        context = shape.prompt_tokens + step
        read = DECODE_WEIGHT_BYTES + shape.rows * context * KV_BYTES_PER_TOKEN
        roofline = max(read / H100_MEMORY_BYTES_PER_S, decode_step_flops(shape.rows, context) / H100_BF16_DENSE_FLOPS)
        seconds += max(roofline, host_step_s)
    return seconds


def model_flop_utilisation(flops: float, seconds: float, peak: float = H100_BF16_DENSE_FLOPS) -> float:
    return flops / seconds / peak
