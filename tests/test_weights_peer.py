"""Weights from a running peer (`serving.weights_peer`), the parts a process test cannot break cheaply: the
checksum catches a flipped bit and swapped elements and does not depend on the layout; the checkpoint identity
changes with its config or data; the structure a puller expects equals what `checkpoints.load` makes. (The pull
itself, worker to worker: tests/test_pd_multiprocess.py::test_a_new_worker_takes_its_weights_from_a_running_peer.)"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import checkpoints
import hf_reference
from serving.weights_peer import _abstract_state, _leaves, checkpoint_identity, leaf_checksum


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("wpeer_ckpt"))
    hf_reference.build(path, dict(num_hidden_layers=2, max_position_embeddings=64), seed=3)
    return path


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.uint8, jnp.int32])
def test_checksum_catches_a_flipped_bit_and_a_swap_not_a_layout(dtype):
    x = np.random.default_rng(0).integers(0, 250, (8, 6)).astype(dtype)
    base = leaf_checksum(jnp.asarray(x))
    flipped = np.array(x).reshape(-1).view(np.uint8).copy()
    flipped[17] ^= 0x08
    swapped = np.array(x)
    swapped[[2, 5]] = swapped[[5, 2]]
    assert leaf_checksum(jnp.asarray(flipped.view(x.dtype).reshape(x.shape))) != base
    assert leaf_checksum(jnp.asarray(swapped)) != base
    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    assert leaf_checksum(jax.device_put(x, NamedSharding(mesh, PartitionSpec("tp")))) == base


def test_checkpoint_identity_follows_config_and_data(ckpt, tmp_path):
    other = str(tmp_path / "copy")
    shutil.copytree(ckpt, other)
    assert checkpoint_identity(other) == checkpoint_identity(ckpt)
    st = next((tmp_path / "copy").glob("*.safetensors"))
    data = bytearray(st.read_bytes())
    n = int.from_bytes(data[:8], "little")
    data[8 + n + 5] ^= 1   # a byte of the first tensor
    st.write_bytes(bytes(data))
    assert checkpoint_identity(other) != checkpoint_identity(ckpt)


@pytest.mark.parametrize("quant,redundant", [(None, 0), ("fp8", 0), (None, 2)])
def test_the_expected_structure_is_what_load_makes(ckpt, quant, redundant):
    """A puller accepts a peer's leaves only if they equal its own expectation; that expectation must be exactly
    what the peer's `checkpoints.load` made (else every pull would fall back)."""
    loaded = checkpoints.load(ckpt, dtype=jnp.float32, quant=quant, redundant_experts=redundant)
    _, state = _abstract_state(ckpt, jnp.float32, quant, redundant)
    p1, l1 = _leaves(nnx.split(loaded)[1])
    p2, l2 = _leaves(state)
    assert p1 == p2
    assert [(x.shape, x.dtype) for x in l1] == [(x.shape, x.dtype) for x in l2]


def test_host_and_device_checksums_agree():
    """The CPU path (numpy) and the accelerator path (an executable) give the same value: a GPU peer and a CPU
    puller (or the reverse) agree."""
    from serving.weights_peer import _words, _words_host

    for dtype, shape in ((np.float32, (7, 5)), (jnp.bfloat16, (3, 3)), (np.uint8, (13,)), (np.int32, (4, 64))):
        x = np.random.default_rng(1).integers(0, 250, shape).astype(dtype)
        assert _words_host(x) == [int(v) for v in np.asarray(_words(jnp.asarray(x)))], dtype
