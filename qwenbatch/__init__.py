"""qwenbatch: batch Qwen3-VL over large image collections, as an offline Ray Data job."""

__version__ = "0.1.0"
