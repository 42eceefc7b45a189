"""Serving: paged latent KV, AOT-compiled prefill/decode engines, continuous batching, PD disaggregation."""

from serving.engine import Engine, EngineConfig, Prefix
from serving.llm import LLM, RequestOutput, Tokenizer
from serving.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "Engine", "EngineConfig", "Prefix", "Tokenizer"]
