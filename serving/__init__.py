"""Serving: paged latent KV, AOT-compiled prefill/decode engines, continuous batching, PD disaggregation."""

from serving.api import Event, Request, RequestMetrics, RequestOutput, Tokenizer
from serving.engine import Engine, Prefix
from serving.config import EngineConfig, SchedulerConfig
from serving.llm import LLM
from serving.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestMetrics", "Request", "Event", "Engine", "EngineConfig",
           "SchedulerConfig", "Prefix", "Tokenizer"]
