"""The short smoke that also runs on the GPU machines' jax (0.11.x, Python >= 3.12: `make test-jax-next`, in CI):
kernels in the Pallas interpreter against the XLA path, their cuda lowering, and a random-weights model generating
the same greedy tokens colocated and disaggregated (prefill and decode on separate meshes, KV moved between).
Nothing here needs torch or a checkpoint.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.random_weights import random_model
from model.config import preset
from pallas_kernels import fp8
from pallas_kernels.compat import lower_for_cuda
from pallas_kernels.formats import quantize
from pallas_kernels.fp4_matmul import fp4_grouped_matmul
from pallas_kernels.paged_attention import paged_mla_decode
from serving import LLM, EngineConfig, SamplingParams

pytestmark = pytest.mark.xla_defaults   # FP4/FP8 codegen or XLA:CPU's compiled HLO (tests/conftest.py)


def test_kernels_in_the_interpreter_equal_the_xla_path_and_lower_for_cuda():
    rng = np.random.default_rng(0)
    r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    sizes = jnp.array([5, 0, 9, 2], jnp.int32)
    x = r(16, 64)
    w8 = fp8.quantize(r(4, 64, 32), lead=1, block=(32, 32))
    w4 = quantize(r(4, 64, 32), "nvfp4")
    cases = {"fp8": (functools.partial(fp8.fp8_grouped_matmul, x, w8, sizes)),
             "nvfp4": (functools.partial(fp4_grouped_matmul, x, w4, sizes))}
    for name, f in cases.items():
        np.testing.assert_allclose(f(impl="pallas_interpret"), f(impl="xla"), rtol=2e-5, atol=2e-5, err_msg=name)
    ql, qr, cache = r(2, 4, 32), r(2, 4, 16), r(1, 6, 16, 48)
    pt, n = jnp.array([[1, 2, 0], [3, 4, 5]], jnp.int32), jnp.array([20, 40], jnp.int32)
    np.testing.assert_allclose(paged_mla_decode(ql, qr, cache, 0, pt, n, 0.2, impl="pallas_interpret", num_splits=2),
                               paged_mla_decode(ql, qr, cache, 0, pt, n, 0.2, impl="xla"), rtol=1e-5, atol=1e-5)
    txt = lower_for_cuda(lambda a, b, c: fp8.fp8_grouped_matmul(a, b, c, impl="pallas"), x.astype(jnp.bfloat16),
                         w8, sizes)
    assert "__gpu$xla.gpu.triton" in txt


@pytest.fixture(scope="module")
def model():
    assert jax.device_count() >= 2, ("prefill and decode need a device each: run with "
                                     "XLA_FLAGS=--xla_force_host_platform_device_count=2 (make test and "
                                     "make test-jax-next set 8)")
    return random_model(preset("tiny").replace(num_hidden_layers=2, first_k_dense_replace=1), quant=None,
                        dtype=jnp.float32, seed=3)


def test_random_model_generates_the_same_tokens_colocated_and_disaggregated(model):
    ec = EngineConfig(page_size=8, num_pages=32, max_model_len=64, prefill_buckets=(16,), prefill_rows=(1,),
                      decode_buckets=(4,), decode_windows=(8,), decode_steps=2)
    prompts = [[5, 9, 2, 7, 1], list(range(3, 24)), [11] * 9]
    sp = SamplingParams(max_tokens=6, ignore_eos=True)
    outs = {}
    for mode in ("colocated", "disagg"):
        with LLM(model=model, engine_config=ec, mode=mode) as llm:
            outs[mode] = [o.token_ids for o in llm.generate(prompts, sp)]
    assert [len(t) for t in outs["colocated"]] == [6, 6, 6]
    assert len({tuple(t) for t in outs["colocated"]}) > 1          # the prompts matter
    assert outs["disagg"] == outs["colocated"]
