"""HF DeepSeek-V3/R1 safetensors -> a ready `model.DeepseekV3`, tensor by tensor.

The model is first built abstractly (`nnx.eval_shape`: shapes, dtypes and logical axes, no memory). Each weight
then has a *plan*: which checkpoint tensors it is made of and how (transpose to [in, out], split heads, stack
experts, dequantize block-fp8). Every tensor is read from its memory map, converted, checked against the declared
shape and placed straight onto its device(s) before the next one is read, so host memory holds about one tensor
at a time. Every checkpoint tensor must be consumed by some plan: leftovers are reported as unexpected.

FP4 (`quant="nvfp4" | "mxfp4"`, optionally `"+dense"`): the routed-expert stacks (and with `+dense` the dense MLPs
and shared experts) are quantized one stack at a time as they are read, and kept packed (`QuantizedTensor`
values in the model's variables) on their devices. A checkpoint written by `python -m checkpoints.quantize` (or an
NVIDIA ModelOpt NVFP4 one: `weight` uint8 + `weight_scale` + `weight_scale_2`) loads its packed tensors as they
are, without re-quantizing; see docs/fp4.md ("Quantized checkpoints").
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import re
import sys
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

from checkpoints.safetensors_io import Checkpoint, CheckpointError
from model.config import ModelConfig
from model.deepseek import DeepseekV3
from model.moe import replica_table, uniform_placement
from model.runtime import Runtime, platform_dtype
from pallas_kernels import formats, fp8
from checkpoints.tensors import (_host_device, _is_packed, _packed_format, checkpoint_quant, parse_quant,
                                 quantized_target, read_packed, read_tensor, weight_block_size)
from sharding.apply import runtime_for, variable_sharding

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How one Tandem weight is made of checkpoint tensors.

    kind: "copy" (as stored), "linear" (HF [out, in] -> [in, out]), "experts" (E tensors [out, in] ->
    [E, in, out]), "out_heads" / "in_heads" (a linear whose out / in axis is split into per-head axes: `shape`),
    "fused_gate" / "fused_up" / "fused_down" (transformers' in-memory fused expert layout), "head_rows" (rows
    [part[0], part[1]) of each head's block of a per-head [H * rows, in] linear, head-major: [H, in, part size])."""

    sources: tuple[str, ...]                         # checkpoint tensor names
    kind: str
    shape: tuple[int, ...] | None = None
    part: tuple[int, int, int] | None = None         # head_rows: (first row, end row, rows per head)
    value: tuple | None = None                       # const: the values (no checkpoint tensor; e.g. a placement)

    def build(self, xs: list[np.ndarray]) -> np.ndarray:
        """Sources (already float) -> the weight in Tandem's layout."""
        k = self.kind
        if k == "const":
            return np.asarray(self.value)
        if k == "copy":
            return xs[0]
        if k == "linear":
            return xs[0].T
        if k == "linear_cat":   # several HF linears reading the same input, concatenated along N
            return np.concatenate(xs, axis=0).T
        if k == "experts":
            return np.stack([x.T for x in xs])
        if k in ("out_heads", "in_heads"):
            return xs[0].T.reshape(self.shape)
        if k == "head_rows":
            r0, r1, rows = self.part
            x = xs[0].reshape(self.shape[0], rows, xs[0].shape[-1])
            return np.ascontiguousarray(x[:, r0:r1].transpose(0, 2, 1))
        F = xs[0].shape[1] // 2
        if k == "fused_gate":
            return xs[0][:, :F].transpose(0, 2, 1)
        if k == "fused_up":
            return xs[0][:, F:].transpose(0, 2, 1)
        if k == "fused_down":
            return xs[0].transpose(0, 2, 1)
        raise AssertionError(k)

    @property
    def matrix(self) -> bool:
        """A linear weight kept as a matrix (block-FP8 / FP4 capable): lead experts, K and N axes."""
        return self.kind in ("linear", "linear_cat", "experts", "out_heads", "in_heads")

    @property
    def lead(self) -> int:
        return 1 if self.kind == "experts" else 0

    @property
    def k_ndim(self) -> int:
        return 2 if self.kind == "in_heads" else 1


def _copy(name: str) -> _Plan:
    return _Plan((name,), "copy")


def _linear(name: str) -> _Plan:
    return _Plan((name,), "linear")


def _attn_plans(prefix: str, cfg: ModelConfig) -> dict[str, _Plan]:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    K, R, V, L = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    a = prefix + "self_attn."
    p = {}
    if cfg.q_lora_rank:   # q_a and kv_a as one matrix (model.attention)
        p["self_attn.qkv_a_proj"] = _Plan((a + "q_a_proj.weight", a + "kv_a_proj_with_mqa.weight"), "linear_cat")
        p["self_attn.q_a_layernorm.weight"] = _copy(a + "q_a_layernorm.weight")
        p["self_attn.q_b_proj"] = _Plan((a + "q_b_proj.weight",), "out_heads", (cfg.q_lora_rank, H, K + R))
    else:
        p["self_attn.q_proj"] = _Plan((a + "q_proj.weight",), "out_heads", (D, H, K + R))
        p["self_attn.kv_a_proj_with_mqa"] = _linear(a + "kv_a_proj_with_mqa.weight")
    p["self_attn.kv_a_layernorm.weight"] = _copy(a + "kv_a_layernorm.weight")
    # kv_b_proj [H*(K+V), L] -> W_uk [H, L, K], W_uv [H, L, V] (model.attention: per-head absorbed einsums)
    p["self_attn.w_uk"] = _Plan((a + "kv_b_proj.weight",), "head_rows", (H, L, K), (0, K, K + V))
    p["self_attn.w_uv"] = _Plan((a + "kv_b_proj.weight",), "head_rows", (H, L, V), (K, K + V, K + V))
    p["self_attn.o_proj"] = _Plan((a + "o_proj.weight",), "in_heads", (H, V, D))
    return p


def _mlp_plans(hf: str, ours: str) -> dict[str, _Plan]:
    return {f"{ours}.{n}": _linear(f"{hf}.{n}.weight") for n in ("gate_proj", "up_proj", "down_proj")}


def _layer_plans(hf_prefix: str, cfg: ModelConfig, moe: bool, ckpt: Checkpoint) -> dict[str, _Plan]:
    p = _attn_plans(hf_prefix, cfg)
    for n in ("input_layernorm", "post_attention_layernorm"):
        p[f"{n}.weight"] = _copy(f"{hf_prefix}{n}.weight")
    m = hf_prefix + "mlp."
    if not moe:
        p.update(_mlp_plans(m[:-1], "mlp"))
        return p
    E = cfg.n_routed_experts
    p["mlp.gate"] = _linear(m + "gate.weight")
    p["mlp.e_score_correction_bias"] = _copy(m + "gate.e_score_correction_bias")
    if m + "experts.gate_up_proj" in ckpt:  # transformers' in-memory fused layout, if someone saved that
        p["mlp.experts_gate_proj"] = _Plan((m + "experts.gate_up_proj",), "fused_gate")
        p["mlp.experts_up_proj"] = _Plan((m + "experts.gate_up_proj",), "fused_up")
        p["mlp.experts_down_proj"] = _Plan((m + "experts.down_proj",), "fused_down")
    else:   # with redundant experts, physical slot p is the uniform placement's expert (`model.moe`)
        logical = uniform_placement(E, cfg.n_physical_experts).tolist()
        for n in ("gate_proj", "up_proj", "down_proj"):
            p[f"mlp.experts_{n}"] = _Plan(tuple(f"{m}experts.{e}.{n}.weight" for e in logical), "experts")
        if cfg.n_redundant_experts:
            table, counts = replica_table(logical, E)
            for name, v in (("expert_logical", logical), ("expert_replicas", table.tolist()),
                            ("expert_n_replicas", counts.tolist())):
                p[f"mlp.{name}"] = _Plan((), "const", value=_tuples(v))
    if cfg.n_shared_experts:
        p.update(_mlp_plans(m + "shared_experts", "mlp.shared_experts"))
    return p


def _tuples(v):
    return tuple(map(_tuples, v)) if isinstance(v, list) else v


def plans(cfg: ModelConfig, ckpt: Checkpoint) -> dict[str, _Plan]:
    """Tandem parameter path ('layers.0.self_attn.o_proj') -> how to build it from the checkpoint."""
    p = {"embed_tokens": _copy("model.embed_tokens.weight"), "norm.weight": _copy("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        p["lm_head"] = _linear("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        for k, v in _layer_plans(f"model.layers.{i}.", cfg, cfg.is_moe_layer(i), ckpt).items():
            p[f"layers.{i}.{k}"] = v
    for d in range(cfg.num_nextn_predict_layers):
        hf = f"model.layers.{cfg.num_hidden_layers + d}."
        for k, v in _layer_plans(hf, cfg, cfg.is_moe_layer(cfg.num_hidden_layers), ckpt).items():
            p[f"mtp.{d}.block.{k}"] = v
        p[f"mtp.{d}.enorm.weight"] = _copy(hf + "enorm.weight")
        p[f"mtp.{d}.hnorm.weight"] = _copy(hf + "hnorm.weight")
        p[f"mtp.{d}.eh_proj"] = _linear(hf + "eh_proj.weight")
        p[f"mtp.{d}.shared_head_norm.weight"] = _copy(hf + "shared_head.norm.weight")
    return p


def _mtp_copies(cfg: ModelConfig) -> dict[str, str]:
    """Per-MTP-layer copies of the shared embedding/head that DeepSeek's release stores: name -> main tensor."""
    out = {}
    for d in range(cfg.num_nextn_predict_layers):
        hf = f"model.layers.{cfg.num_hidden_layers + d}."
        out[hf + "embed_tokens.weight"] = "model.embed_tokens.weight"
        out[hf + "shared_head.head.weight"] = "lm_head.weight"
    return out


def mtp_layers_present(cfg: ModelConfig, ckpt: Checkpoint) -> int:
    """How many MTP layers (`model.layers.{num_hidden_layers + d}.*`) the checkpoint really holds."""
    prefixes = {k.split(".")[2] for k in ckpt.keys() if k.startswith("model.layers.")}
    n = 0
    while str(cfg.num_hidden_layers + n) in prefixes:
        n += 1
    return n


def config_of(path: str | os.PathLike) -> ModelConfig:
    """The model config a checkpoint directory loads as (its config.json, with the MTP layers it really holds)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg = ModelConfig.from_hf(path)
    n_mtp = mtp_layers_present(cfg, Checkpoint(path))
    return cfg if n_mtp == cfg.num_nextn_predict_layers else cfg.replace(num_nextn_predict_layers=n_mtp)


# Weights DeepSeek's release stores in block FP8 (and `quant="fp8"` quantizes): every linear of the decoder layers
# (attention projections, dense MLPs, shared and routed experts) — not the embedding, head, router or eh_proj.
_FP8_EXCLUDED = re.compile(r"(^lm_head$|(^|\.)mlp\.gate$|(^|\.)eh_proj$)")


def fp8_target(name: str, plan: _Plan) -> bool:
    return plan.matrix and not _FP8_EXCLUDED.search(name)


def _is_fp8(ckpt: Checkpoint, name: str) -> bool:
    return ckpt.dtype(name) == np.dtype(ml_dtypes.float8_e4m3fn) and _scale_inv_name(name) in ckpt


def _scale_inv_name(name: str) -> str:
    return name[: -len("weight")] + "weight_scale_inv"


def _key(idx: tuple[slice, ...], shape) -> tuple:
    return tuple(sl.indices(n)[:2] for sl, n in zip(idx, shape))


def _expert_range(idx: tuple[slice, ...], E: int) -> tuple[int, int]:
    return idx[0].indices(E)[:2]


class _Weight:
    """Builds one weight of the model from its checkpoint tensors, one device shard at a time.

    `value_like` is the weight's representation as abstract leaves (an array, an `Fp8Tensor` or an FP4
    `QuantizedTensor` of ShapeDtypeStructs); `place()` returns the same structure of placed arrays. Expert stacks
    are read per shard (only the experts in that shard's range), never as a full host array of the layer; other
    weights are built once (cached) and sliced per shard."""

    def __init__(self, name: str, plan: _Plan, rep: str, ckpt: Checkpoint, block, dtype, shape, fmt: str | None,
                 fp8_block=fp8.BLOCK):
        self.name, self.plan, self.rep, self.ckpt, self.block = name, plan, rep, ckpt, block
        self.fp8_block = tuple(fp8_block)
        self.dtype, self.shape, self.fmt = dtype, tuple(shape), fmt
        self._cache: dict = {}
        self._lock = threading.Lock()

    # ---- the representation ----------------------------------------------------------------------------------
    def abstract(self):
        p, shape = self.plan, self.shape
        if self.rep == "plain":
            return jax.ShapeDtypeStruct(shape, self.dtype)
        if self.rep in ("fp8_kept", "fp8"):
            return fp8.abstract(shape, lead=p.lead, k_ndim=p.k_ndim, block=self._fp8_block())
        return formats.abstract(shape, self.fmt)

    def _fp8_block(self):
        if self.rep == "fp8_kept":
            bo, bi = self.block
            return (bi, bo)          # HF [out, in] blocks -> [K = in, N = out]
        return self.fp8_block

    # ---- host pieces -----------------------------------------------------------------------------------------
    def _sources(self, names) -> list[np.ndarray]:
        return [read_tensor(self.ckpt, n, self.block) for n in names]

    def _chunk(self, e0: int, e1: int):
        """The whole weight (e0 = e1 = -1) or experts [e0, e1) of an expert stack, in its representation, as host
        arrays (cached per range: replicated shards and sibling leaves reuse it)."""
        key = (e0, e1)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        p = self.plan
        names = p.sources if e0 < 0 else p.sources[e0:e1]
        stacked = p.kind == "experts"
        shape = self.shape if e0 < 0 else (e1 - e0, *self.shape[1:])
        if self.rep == "plain":
            out = np.asarray(p.build(self._sources(names))).astype(self.dtype)
            if out.shape != shape:
                raise CheckpointError(f"tensor {names[0]!r} in {self.ckpt.file_of(names[0])} has shape "
                                      f"{list(self.ckpt.shape(names[0]))}, which does not fit {self.name} "
                                      f"{list(self.shape)} for this config")
        elif self.rep == "fp4_stored":
            out = read_packed(self.ckpt, names, shape, stacked=stacked)
        elif self.rep == "fp8_kept":
            codes = [self.ckpt.get(n) for n in names]
            scales = [self.ckpt.get(_scale_inv_name(n)) for n in names]
            for n, c, sc in zip(names, codes, scales):
                want = (-(-c.shape[0] // self.block[0]), -(-c.shape[1] // self.block[1]))
                if tuple(sc.shape) != want:
                    raise CheckpointError(f"tensor {_scale_inv_name(n)!r} in {self.ckpt.file_of(n)} has shape "
                                          f"{list(sc.shape)}, expected {list(want)} for a {list(c.shape)} weight in "
                                          f"{self.block[0]}x{self.block[1]} blocks")
            cat = p.kind == "linear_cat"   # (`representation`: every part but the last fills whole blocks)
            w = np.stack(codes) if stacked else np.concatenate(codes) if cat else codes[0]
            si = np.stack(scales) if stacked else np.concatenate(scales) if cat else scales[0]
            out = fp8.from_checkpoint(w, si.astype(np.float32), shape, lead=p.lead, k_ndim=p.k_ndim,
                                      block=self.block)
        else:   # quantized here: "fp8" (block FP8) or "fp4" (nvfp4 / mxfp4), on the host CPU
            x = p.build(self._sources(names))
            with jax.default_device(_host_device()):
                q = (fp8.quantize(x, lead=p.lead, k_ndim=p.k_ndim, block=self.fp8_block) if self.rep == "fp8" else
                     formats.quantize(jnp.asarray(x, jnp.float32), self.fmt))
                out = jax.tree.map(np.asarray, q)
        with self._lock:
            self._cache[key] = out
        return out

    def _check_shape(self):
        """Mis-shaped sources fail before any placement, with the tensor and file named."""
        p = self.plan
        if p.kind in ("linear", "out_heads", "in_heads", "experts"):
            for n in p.sources[:1] + p.sources[-1:]:
                shp = self.ckpt.shape(n)
                if _is_packed(self.ckpt, n):
                    continue
                K = int(np.prod(self.shape[p.lead:p.lead + p.k_ndim]))
                N = int(np.prod(self.shape[p.lead + p.k_ndim:]))
                if tuple(shp) != (N, K):
                    raise CheckpointError(f"tensor {n!r} in {self.ckpt.file_of(n)} has shape {list(shp)}, which "
                                          f"does not fit {self.name} {list(self.shape)} for this config")
        elif p.kind == "linear_cat":
            shapes = [tuple(self.ckpt.shape(n)) for n in p.sources]
            if any(len(x) != 2 or x[1] != self.shape[0] for x in shapes) or sum(x[0] for x in shapes) != \
                    self.shape[1]:
                raise CheckpointError(f"tensors {list(p.sources)} have shapes {[list(x) for x in shapes]}, which "
                                      f"do not fit {self.name} {list(self.shape)} (their rows concatenated) for this "
                                      "config")
        elif p.kind == "head_rows":
            n = p.sources[0]
            want = (self.shape[0] * p.part[2], self.shape[1])
            if tuple(self.ckpt.shape(n)) != want:
                raise CheckpointError(f"tensor {n!r} in {self.ckpt.file_of(n)} has shape {list(self.ckpt.shape(n))}, "
                                      f"expected {list(want)} for {self.name} {list(self.shape)} of this config")
        elif p.kind == "copy":
            n = p.sources[0]
            if tuple(self.ckpt.shape(n)) != self.shape:
                raise CheckpointError(f"tensor {n!r} in {self.ckpt.file_of(n)} has shape "
                                      f"{list(self.ckpt.shape(n))}, which does not fit {self.name} "
                                      f"{list(self.shape)} for this config")

    def _leaf_piece(self, leaf_path, idx, leaf_shape):
        """Host slice `idx` of one leaf (codes / scales / tensor scale, or the array itself)."""
        per_expert = self.plan.kind == "experts"
        if per_expert and len(idx) >= 1 and len(leaf_shape) >= 1 and leaf_shape[0] == self.shape[0]:
            e0, e1 = _expert_range(idx, self.shape[0])
            chunk = self._chunk(e0, e1)
            idx = (slice(None),) + tuple(idx[1:])
        else:
            chunk = self._chunk(-1, -1)
        leaf = chunk if not leaf_path else _get_path(chunk, leaf_path)
        return np.asarray(leaf)[tuple(idx)]

    def place(self, shardings):
        """The weight on its shardings (a pytree like `abstract()`, or None: the default device)."""
        self._check_shape()
        abstract = self.abstract()
        if shardings is None:
            full = self._chunk(-1, -1)
            return jax.tree.map(lambda a: jnp.asarray(a), full)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
        sh_leaves = jax.tree.leaves(shardings)
        out = []
        for (path, a), sh in zip(leaves, sh_leaves):
            idx_map = sh.addressable_devices_indices_map(a.shape)
            pieces, arrays = {}, []
            for dev, idx in idx_map.items():
                k = _key(idx, a.shape)
                if k not in pieces:
                    pieces[k] = np.array(self._leaf_piece(path, idx, a.shape), dtype=a.dtype, order="C", copy=None)
                arrays.append(jax.device_put(pieces[k], dev))
            out.append(jax.make_array_from_single_device_arrays(a.shape, sh, arrays))
        self._cache.clear()
        return jax.tree_util.tree_unflatten(treedef, out)


def _get_path(tree, path):
    for k in path:
        tree = getattr(tree, k.name) if hasattr(k, "name") else tree[k.idx if hasattr(k, "idx") else k.key]
    return tree


def load(path: str | os.PathLike, *, dtype=None, mesh=None, rules=None, quant: str | None = None,
         keep_fp8: bool = True, fp8_block: tuple[int, int] = fp8.BLOCK, runtime: Runtime | None = None,
         capacity_factor: float = 2.0, threads: int = 4, progress: bool = False, redundant_experts: int = 0
         ) -> DeepseekV3:
    """Load an HF DeepSeek-V3/R1 checkpoint directory into a `DeepseekV3` model, placed tensor by tensor.

    dtype: the weights' dtype (default by the target platform, `model.runtime.platform_dtype`: float32 on CPU,
    bfloat16 on GPU/TPU). The router and its
    correction bias always stay float32. The MTP module is loaded when the checkpoint has
    `model.layers.{num_hidden_layers}.*`; otherwise the model has none.
    mesh / rules: place each weight onto its sharding as it is read (`sharding.rules`) and set the model's
    `runtime` for that mesh (kernel choices from `runtime`, expert parallelism from the rules). Each device shard
    is built on the host and put on its device: an expert stack is read only for the experts of that shard.
    quant: None (the checkpoint's own formats), "fp8" (block-FP8 every decoder-layer linear), or "nvfp4" /
    "mxfp4" (the routed experts; "+dense" also the dense MLPs and shared experts) — quantized per shard on the
    host CPU and kept packed (`QuantizedTensor`). A quantized checkpoint (`python -m checkpoints.quantize`, or
    ModelOpt NVFP4) loads packed as stored; `quant` may then be None or must name the checkpoint's format.
    keep_fp8: DeepSeek block-FP8 tensors stay FP8 on device (`pallas_kernels.fp8.Fp8Tensor`, W8A16 matmuls);
    False dequantizes them to `dtype`. fp8_block: the (K, N) block of `quant="fp8"` (DeepSeek's 128 x 128).
    threads: weights prepared concurrently (I/O and conversion); progress: a progress bar on stderr.
    redundant_experts: extra routed-expert slots per MoE layer (EPLB; `sharding.eplb` rebalances them later),
    loaded as the uniform placement — each slot read straight from its expert's tensors.
    """
    path = os.fspath(path)
    if quant == "fp8":
        fmt, dense, quant_fp8 = None, False, True
    else:
        (fmt, dense), quant_fp8 = parse_quant(quant), False
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    cfg = ModelConfig.from_hf(path)
    ckpt = Checkpoint(path)
    n_mtp = mtp_layers_present(cfg, ckpt)
    if n_mtp != cfg.num_nextn_predict_layers:
        log.info("checkpoint has %d MTP layer(s) (config says %d); loading %d", n_mtp,
                 cfg.num_nextn_predict_layers, n_mtp)
        cfg = cfg.replace(num_nextn_predict_layers=n_mtp)
    if redundant_experts:   # EPLB: extra expert slots, loaded in the uniform placement (`sharding.eplb`)
        cfg = cfg.replace(n_redundant_experts=redundant_experts)
    if dtype is None:
        dtype = platform_dtype((runtime.platform if runtime is not None and runtime.platform else None)
                               or (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform)
    dtype = jnp.dtype(dtype)
    block = weight_block_size(path)
    stored = checkpoint_quant(path)
    if stored is not None:
        if fmt is not None and fmt != stored.get("format"):
            raise ValueError(f"quant={quant!r} but the checkpoint at {path} is already quantized to "
                             f"{stored.get('format')!r}; load it with quant=None (or {stored.get('format')!r})")
        if fmt is None and str(stored.get("modules", "")).endswith("+dense"):
            dense = True
        fmt = stored.get("format")

    abstract = nnx.eval_shape(lambda: DeepseekV3(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    plan = plans(cfg, ckpt)
    ours = {".".join(map(str, k)): k for k in flat}
    if set(ours) != set(plan):  # a bug in this file, not in the checkpoint
        raise AssertionError(f"loader plan and model differ: {sorted(set(ours) ^ set(plan))}")

    needed = {s for p in plan.values() for s in p.sources}
    missing = sorted(needed - set(ckpt.keys()))
    if missing:
        raise CheckpointError(f"checkpoint at {path} is missing {len(missing)} tensor(s): "
                              + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    copies = _mtp_copies(cfg)
    scales = {k for k in ckpt.keys() if k.endswith((".weight_scale_inv", ".weight_scale", ".weight_scale_2",
                                                    ".input_scale"))}  # input_scale: FP4 activations, unused
    unexpected = sorted(set(ckpt.keys()) - needed - set(copies) - scales)
    if unexpected:
        raise CheckpointError(f"checkpoint at {path} has {len(unexpected)} unexpected tensor(s) for this config, "
                              f"e.g. {unexpected[0]!r} in {ckpt.file_of(unexpected[0])}: "
                              + ", ".join(unexpected[:8]))
    for copy, main in copies.items():  # stored duplicates must really be the shared weights
        if copy in ckpt and main in ckpt:
            a, b = ckpt.get_rows(copy, 8).astype(np.float32), ckpt.get_rows(main, 8).astype(np.float32)
            if a.shape != b.shape or not np.array_equal(a, b):
                raise CheckpointError(f"tensor {copy!r} differs from {main!r}: Tandem's MTP shares the main "
                                      "model's embedding and head")

    def representation(name: str, p: _Plan) -> tuple[str, str | None]:
        if quantized_target(name, True) and p.kind in ("linear", "experts") and all(
                _is_packed(ckpt, s) for s in p.sources):
            return "fp4_stored", _packed_format(ckpt, p.sources[0])
        if fmt is not None and quantized_target(name, dense) and p.kind in ("linear", "experts"):
            return "fp4", fmt
        if keep_fp8 and fp8_target(name, p) and all(_is_fp8(ckpt, s) for s in p.sources) and (
                p.kind != "linear_cat" or all(ckpt.shape(s)[0] % block[0] == 0 for s in p.sources[:-1])):
            return "fp8_kept", None   # (parts of a concatenation must not share a scale block; else dequantized)
        if quant_fp8 and fp8_target(name, p):
            return "fp8", None
        return "plain", None

    weights = {}
    for name, key in ours.items():
        var, p = flat[key], plan[name]
        rep, f = representation(name, p)
        weights[name] = _Weight(name, p, rep, ckpt, block, var.get_value().dtype, var.get_value().shape, f,
                                fp8_block)

    def place_one(name: str):
        w = weights[name]
        axes = flat[ours[name]].get_metadata().get("axes")
        shardings = None if mesh is None else variable_sharding(w.abstract(), axes, mesh, rules)
        return name, w.place(shardings)

    bar = tqdm(total=len(weights), desc=f"loading {os.path.basename(path)}", unit="weight", disable=not progress,
               file=sys.stderr)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for name, value in pool.map(place_one, list(weights)):
            flat[ours[name]].set_value(value)
            bar.update(1)
    bar.close()
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    model.runtime = runtime_for(mesh, rules, base=runtime, capacity_factor=capacity_factor)
    return model


@functools.lru_cache(maxsize=8)
def _abstract_state(cfg: ModelConfig, dtype):
    return nnx.split(nnx.eval_shape(lambda: DeepseekV3(cfg, rngs=nnx.Rngs(0), dtype=dtype)))


class _NoTensors:
    """A stand-in checkpoint with no tensors (plans for an abstract model)."""

    def __contains__(self, name: str) -> bool:
        return False


def abstract_model(cfg: ModelConfig, *, dtype=jnp.bfloat16, quant: str | None = None, fp8_linears: bool = False,
                   mesh=None, rules=None, runtime: Runtime | None = None, capacity_factor: float = 2.0,
                   fp8_block: tuple[int, int] = fp8.BLOCK) -> DeepseekV3:
    """The model a checkpoint of `cfg` would load as, with no data: every weight a ShapeDtypeStruct (or an
    `Fp8Tensor` / `QuantizedTensor` of them) carrying its sharding on `mesh`. For memory plans and for lowering
    real-dims executables without weights.

    quant: as in `load` ("fp8", "nvfp4", "mxfp4", "+dense"); fp8_linears: the other decoder linears in block FP8
    (DeepSeek's release format kept on device), e.g. quant="nvfp4", fp8_linears=True = FP4 experts + FP8
    attention and dense MLPs, as NVIDIA's DeepSeek-R1-FP4."""
    dtype = jnp.dtype(dtype)
    if quant == "fp8":
        fmt, dense, fp8_linears = None, False, True
    else:
        fmt, dense = parse_quant(quant)
    graphdef, state = _abstract_state(cfg, dtype)       # traced once per (config, dtype): V3's takes seconds
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x, state, is_leaf=lambda x: isinstance(x, nnx.Variable)),
                      copy=True)
    plan = plans(cfg, _NoTensors())
    for path, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable):
            continue
        name = ".".join(map(str, path))
        p, value = plan[name], var.get_value()
        if fmt is not None and quantized_target(name, dense) and p.kind in ("linear", "experts"):
            value = formats.abstract(value.shape, fmt)
        elif fp8_linears and fp8_target(name, p):
            value = fp8.abstract(value.shape, lead=p.lead, k_ndim=p.k_ndim, block=fp8_block)
        if mesh is not None:
            shardings = variable_sharding(value, var.get_metadata().get("axes"), mesh, rules)
            value = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), value, shardings)
        var.set_value(value)
    model.runtime = runtime_for(mesh, rules, base=runtime, capacity_factor=capacity_factor)
    return model
