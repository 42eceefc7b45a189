"""HF safetensors checkpoints -> Tandem models (and back)."""

from checkpoints.loader import abstract_model, config_of, dequantize_block_fp8, load
from checkpoints.safetensors_io import Checkpoint, CheckpointError

__all__ = ["load", "abstract_model", "config_of", "Checkpoint", "CheckpointError", "dequantize_block_fp8"]
