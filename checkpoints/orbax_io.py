"""Orbax save/restore of a loaded model, resharding onto any mesh on the way back.

    save(model, "/ckpt/v3-orbax")                                    # whatever mesh the weights are on
    model = restore("/ckpt/v3-orbax", cfg, mesh=decode_mesh, rules=DECODE_RULES)

The checkpoint holds the weights only (a pure dict of arrays under the model's variable paths) plus the model
config as JSON metadata, so `restore` can rebuild the module from the path alone. Restore builds the model
abstractly, derives each weight's target sharding from its logical axes and `rules`, and asks orbax for exactly
those shardings: every device reads only its shards, and nothing is materialised on the saving mesh.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from model.config import ModelConfig
from model.deepseek import DeepseekV3
from sharding.apply import runtime_for
from sharding.rules import logical_sharding

_CONFIG_KEY = "tandem_model_config"


def save(model: DeepseekV3, path: str | os.PathLike) -> None:
    """Write `model`'s weights (any sharding) to the orbax checkpoint directory `path` (must not exist)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"orbax checkpoint directory {path} already exists; choose a new path")
    state = nnx.to_pure_dict(nnx.state(model))
    meta = {_CONFIG_KEY: model.cfg.to_hf_dict(), "dtype": str(jax.numpy.dtype(model.dtype))}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path, state, custom_metadata=meta)
    ckptr.wait_until_finished()


def saved_config(path: str | os.PathLike) -> tuple[ModelConfig, str]:
    """(model config, dtype name) stored with a checkpoint written by `save`."""
    path = os.path.abspath(os.fspath(path))
    meta = ocp.StandardCheckpointer().metadata(path)
    custom = getattr(meta, "custom_metadata", None) or {}
    if _CONFIG_KEY not in custom:
        raise ValueError(f"{path} has no Tandem model config in its metadata (not written by checkpoints.orbax_io."
                         "save?); pass the config or a model to restore()")
    return ModelConfig.from_hf(custom[_CONFIG_KEY]), custom.get("dtype", "float32")


def restore(path: str | os.PathLike, like: DeepseekV3 | ModelConfig | None = None, *, mesh=None, rules=None,
            dtype=None, capacity_factor: float = 2.0) -> DeepseekV3:
    """Read an orbax checkpoint written by `save` into a new `DeepseekV3` placed on `mesh` under `rules`.

    like: a model or config describing the architecture (default: the config stored in the checkpoint).
    mesh=None restores onto the default device. With a mesh, the model's runtime is set for it as in
    `sharding.place` (expert parallelism when the rules split the experts).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"orbax checkpoint directory {path} does not exist")
    if like is None:
        cfg, saved_dtype = saved_config(path)
        dtype = dtype or saved_dtype
    elif isinstance(like, ModelConfig):
        cfg = like
    else:
        cfg, dtype = like.cfg, dtype or like.dtype
    dtype = jax.numpy.dtype(dtype or "float32")
    abstract = nnx.eval_shape(lambda: DeepseekV3(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, state = nnx.split(abstract)

    if mesh is None:
        dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        sharding_of = lambda axes: dev
    else:
        sharding_of = lambda axes: logical_sharding(axes, mesh, rules)

    target = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=sharding_of(v.get_metadata().get("axes"))),
        state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    target = nnx.to_pure_dict(target)
    try:
        values = ocp.StandardCheckpointer().restore(path, target)
    except (ValueError, KeyError) as e:
        raise ValueError(f"orbax checkpoint {path} does not match a {cfg.num_hidden_layers}-layer model of this "
                         f"config: {e}") from e
    nnx.replace_by_pure_dict(state, values)
    model = nnx.merge(graphdef, state)
    model.runtime = runtime_for(mesh, rules, capacity_factor=capacity_factor)
    return model
