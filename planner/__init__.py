"""Deployment planning, above serving: the cluster simulator (`python -m planner`: predicted TTFT / TPOT /
tok/s/GPU of xPyD layouts on H100/H200/B200/GB200 NVL72, Pareto fronts, SLO sizing) and the per-device memory plan
of one engine (`python -m planner.memory`). Both read the engine's compiled executables (collective bytes,
temporaries), which is why they sit on top of `serving`. Design: docs/planner.md."""

from planner.cli import FIT_RANGES, PUBLISHED, fit_published, load_profile, main, profile_name
from planner.hardware import HARDWARE, Efficiency, Hardware, ModelCosts, model_costs
from planner.profile import StepProfile, build_profile
from planner.cluster import (Point, Workload, at_interactivity, best_prefill, decode_layouts, kv_fits, pareto,
                              simulate, size_for_slo)
from planner.step import DecodeLayout, PrefillLayout, StepTime, decode_step, executable_step, prefill_time

__all__ = ["FIT_RANGES", "PUBLISHED", "fit_published", "load_profile", "main", "profile_name", "HARDWARE", "Efficiency",
           "Hardware", "ModelCosts", "model_costs", "StepProfile", "build_profile", "Point", "Workload",
           "at_interactivity", "best_prefill", "decode_layouts", "kv_fits", "pareto", "simulate", "size_for_slo",
           "DecodeLayout", "PrefillLayout", "StepTime", "decode_step", "executable_step", "prefill_time"]
