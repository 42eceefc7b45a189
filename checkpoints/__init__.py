"""HF safetensors checkpoints -> Tandem models (and back)."""

from checkpoints.loader import dequantize_block_fp8, load
from checkpoints.safetensors_io import Checkpoint, CheckpointError

__all__ = ["load", "Checkpoint", "CheckpointError", "dequantize_block_fp8"]
