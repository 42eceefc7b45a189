"""HF safetensors checkpoints -> Tandem models (and back)."""

from checkpoints.loader import abstract_model, config_of, load
from checkpoints.tensors import dequantize_block_fp8
from checkpoints.safetensors_io import Checkpoint, CheckpointError

__all__ = ["load", "abstract_model", "config_of", "Checkpoint", "CheckpointError", "dequantize_block_fp8"]
