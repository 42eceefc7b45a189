"""Tandem as an NVIDIA Dynamo backend: Dynamo's own frontend (ai-dynamo 1.6.1) in front of `python -m serving.dynamo`
workers, driven by the real `openai` client. One host, nothing else to start: file discovery, TCP request plane,
ZMQ events through the loopback broker; every listener of every process started here is asserted on 127.0.0.1.

Two deployments share the broker: namespace `tagg` (2 aggregated workers, KV-aware routing, migration on) and
namespace `tpd` (1 prefill worker + 1 decode instance that is a worker group of 2 processes, dp=2 — one attention rank each — registered by its
leader as one worker). The reference is `LLM.generate` on the same checkpoint (f32).
"""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from serving import LLM, EngineConfig, SamplingParams
from serving.config import DEFAULT_CHECKPOINT
from serving.openai_api import DEFAULT_CHAT_TEMPLATE, chat_prompt

from serving.dynamo import OptionError, request_options, signed64   # needs the dynamo extra
from serving.dynamo_setup import local_env
from test_pd_multiprocess import ROOT, TOKEN, _free_port, control

MODEL = "shakespeare-moe"
ENGINE = ["--dtype=float32", "--page_size=8", "--num_pages=96", "--max_model_len=128", "--prefill_buckets=16,64",
          "--decode_buckets=1,2,4", "--decode_steps=4", "--prefix_caching"]
EC = EngineConfig(page_size=8, num_pages=96, max_model_len=128, prefill_buckets=(16, 64), decode_buckets=(1, 2, 4),
                  decode_steps=4, prefix_caching=True)
HELD_OUT = ["Upon the heath the thunder spoke", "My lord, the queen is", "What light through yonder"]
LONG = ["KING: Go, bid the soldiers shoot, and let the drums beat loud upon the walls of this our town, for we",
        "HAMLET: O that this too too solid flesh would melt, thaw, and resolve itself into a dew, or that the",
        "PORTIA: The quality of mercy is not strain'd; it droppeth as the gentle rain from heaven upon the place"]
XLA_CACHE = os.environ.get("TANDEM_TEST_XLA_CACHE", os.path.expanduser("~/.cache/tandem/xla_test_cache"))
EXE_CACHE = os.environ.get("TANDEM_TEST_EXE_CACHE", os.path.expanduser("~/.cache/tandem/exe_test_cache"))
READY_S = 240.0


def listeners(pids) -> list[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket the processes hold (/proc: no tools needed)."""
    inodes = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except FileNotFoundError:
            continue
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:   # 0A: LISTEN
                    continue
                hexaddr = cols[1].split(":")[0]
                raw = bytes.fromhex(hexaddr)
                if v6:
                    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                    ip = socket.inet_ntop(socket.AF_INET6, b"".join(words))
                else:
                    ip = socket.inet_ntoa(raw[::-1])
                out.append((inodes[cols[9]], ip))
    return out


class Procs:
    def __init__(self, tmp):
        self.tmp, self.procs = tmp, {}
        xsub, xpub = _free_port(), _free_port()
        self.env = dict(os.environ, **local_env(tmp, xsub, xpub), HOME=os.path.join(tmp, "home"),
                        JAX_PLATFORMS="cpu",
                        XLA_FLAGS="--xla_force_host_platform_device_count=1 " + os.environ["TANDEM_TEST_XLA_FLAGS"],
                        TANDEM_TOKEN=TOKEN, PYTHONPATH=ROOT)
        self.xsub, self.xpub = xsub, xpub

    def start(self, name, args):
        log = open(os.path.join(self.tmp, f"{name}.log"), "a")
        self.procs[name] = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT)

    def log(self, name) -> str:
        with open(os.path.join(self.tmp, f"{name}.log")) as f:
            return f.read()

    def worker(self, name, role, namespace, *extra):
        self.start(name, ["-m", "serving.dynamo", f"--role={role}", f"--namespace={namespace}",
                          f"--card_dir={os.path.join(self.tmp, 'cards')}", f"--compilation_cache_dir={XLA_CACHE}",
                          f"--executable_cache_dir={EXE_CACHE}", "--discovery_backend=file", *ENGINE, *extra])

    def control(self, name) -> str:
        for line in self.log(name).splitlines():
            if line.startswith("TANDEM_DYNAMO_READY "):
                import json
                return json.loads(line.split(" ", 1)[1])["control"]
        raise RuntimeError(f"{name} is not ready")

    def wait_log(self, name, text, timeout):
        end = time.monotonic() + timeout
        while text not in self.log(name):
            p = self.procs[name]
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited ({p.returncode}):\n{self.log(name)[-4000:]}")
            if time.monotonic() > end:
                raise TimeoutError(f"{name}: no {text!r} in {timeout:.0f}s:\n{self.log(name)[-4000:]}")
            time.sleep(0.2)

    def close(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=10)


def stats(addr) -> dict:
    """A Tandem worker's stats over its control endpoint (pages, leases, load)."""
    return control(addr, "stats")


def wait_drained(addrs, timeout=10.0):
    """Every page of every worker free (cached prefix blocks count as free: they hold no request) and no lease."""
    end = time.monotonic() + timeout
    while True:
        pages = {a: stats(a)["pages"] for a in addrs}
        if all(p["used"] == 0 and p["leased"] == 0 for p in pages.values()):
            return pages
        if time.monotonic() > end:
            raise AssertionError(f"pages still held after {timeout}s: {pages}")
        time.sleep(0.1)


def wait_model(port, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2.0)
            if any(m["id"] == MODEL for m in r.json().get("data", [])):
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"model {MODEL} not served on :{port} in {timeout:.0f}s")


@pytest.fixture(scope="module")
def dyn(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("dynamo"))
    P = Procs(tmp)
    try:
        P.start("broker", ["-m", "serving.dynamo", "--role=broker", f"--xsub_port={P.xsub}", f"--xpub_port={P.xpub}"])
        P.wait_log("broker", "TANDEM_DYNAMO_BROKER_READY", 60)
        P.fe_agg, P.fe_pd = _free_port(), _free_port()
        P.start("fe_agg", ["-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(P.fe_agg),
                           "--router-mode", "kv", "--migration-limit", "3", "--namespace", "tagg"])
        P.start("fe_pd", ["-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(P.fe_pd),
                          "--namespace", "tpd"])
        # the first worker fills the compilation cache; the others then start from it
        slow = "--fault_step_delay_s=0.05"   # streams last long enough to kill or leave them midway
        P.worker("agg1", "aggregated", "tagg", slow)
        P.wait_log("agg1", "TANDEM_DYNAMO_READY", READY_S)
        P.worker("agg2", "aggregated", "tagg", slow)
        P.worker("prefill", "prefill", "tpd", "--lease_s=60")
        # the decode instance is a worker group (2 processes, dp=2: an attention rank and half the experts each): its leader is the one Dynamo sees
        coord = f"127.0.0.1:{_free_port()}"
        for k, name in enumerate(("decode", "decode_follower")):
            P.worker(name, "decode", "tpd", "--fault_step_delay_s=0.1", "--mesh=dp=2", "--num_processes=2",
                     f"--process_id={k}", f"--coordinator_address={coord}", "--group_timeout_s=200")
        for name in ("agg2", "prefill", "decode"):
            P.wait_log(name, "TANDEM_DYNAMO_READY", READY_S)
        wait_model(P.fe_agg, 60)
        wait_model(P.fe_pd, 60)
        yield P
    finally:
        P.close()


@pytest.fixture(scope="module")
def ref():
    llm = LLM(DEFAULT_CHECKPOINT, engine_config=EC)
    yield llm
    llm.close()


def test_request_options_apply_or_refuse():
    """Every Dynamo option is applied (neutral values of unimplemented ones pass) or refused by name."""
    req = {"token_ids": [5, 6, 7], "sampling_options": {"temperature": 0.5, "top_p": 0.9, "top_k": -1, "seed": 3,
                                                         "n": 2, "min_p": 0.0, "presence_penalty": None,
                                                         "repetition_penalty": 1.0},
           "stop_conditions": {"max_tokens": 500, "stop": ["x"], "stop_token_ids": [9], "stop_token_ids_hidden": [1],
                               "ignore_eos": True, "min_tokens": 0}, "output_options": {"skip_special_tokens": True}}
    wire, n, limit = request_options(req, max_model_len=64)
    assert (n, limit) == (2, 61) and wire == {"max_tokens": 61, "temperature": 0.5, "top_p": 0.9, "top_k": 0,
                                              "stop": [], "stop_token_ids": [1, 9], "ignore_eos": True,
                                              "min_tokens": 0, "structured_output": None, "logprobs": None,
                                              "repetition_penalty": 1.0}
    assert request_options({"token_ids": [1]}, 64)[0]["temperature"] == 1.0   # OpenAI's default
    ok = {"token_ids": [1], "sampling_options": {"frequency_penalty": 0.5, "presence_penalty": 0.25,
                                                 "guided_decoding": {"regex": "[ab]+", "backend": None}},
          "stop_conditions": {"min_tokens": 4}, "output_options": {"logprobs": 2}}
    wire = request_options(ok, 64)[0]
    assert (wire["frequency_penalty"], wire["presence_penalty"], wire["min_tokens"], wire["logprobs"],
            wire["structured_output"]) == (0.5, 0.25, 4, 2, ["regex", "[ab]+"])
    bad = {"token_ids": [1], "sampling_options": {"min_p": 0.1, "guided_decoding": {"json": {}, "regex": "a"},
                                                  "mystery": 1},
           "output_options": {"prompt_logprobs": 2}}
    with pytest.raises(OptionError) as e:
        request_options(bad, 64)
    for name in ("min_p", "guided_decoding", "mystery", "prompt_logprobs"):
        assert name in str(e.value)
    with pytest.raises(OptionError, match="top_p"):
        request_options({"token_ids": [1], "sampling_options": {"top_p": 0.0}}, 64)
    with pytest.raises(OptionError, match="outside the vocabulary"):
        request_options({"token_ids": [1, 4096]}, 64, vocab_size=4096)
    with pytest.raises(OptionError, match="context length is 64"):
        request_options({"token_ids": list(range(64))}, 64)
    assert signed64(2**64 - 1) == -1 and signed64(5) == 5


def test_from_args_builds_only_worker_roles():
    """Dynamo's own constructor path (`run(TandemEngine)` -> from_args) parses Tandem's flags (own process: absl
    flags are global)."""
    code = "import asyncio; from serving.dynamo import TandemEngine; asyncio.run(TandemEngine.from_args(['--role=broker']))"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode != 0 and "a Dynamo worker is one of" in p.stderr, p.stderr[-2000:]


def client(port) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60.0, max_retries=0)


def test_every_listener_is_on_loopback(dyn):
    got = listeners([p.pid for p in dyn.procs.values()])
    assert len({pid for pid, _ in got}) >= 8, got   # broker, 2 frontends, 5 worker processes: each listens
    assert [(pid, ip) for pid, ip in got if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")] == []


@pytest.mark.parametrize("fe", ["fe_agg", "fe_pd"])
def test_greedy_equals_llm_generate(dyn, ref, fe):
    c = client(getattr(dyn, fe))
    want = [o.text for o in ref.generate(HELD_OUT, SamplingParams(max_tokens=24))]
    got = [c.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text
           for p in HELD_OUT]
    assert got == want
    msgs = [{"role": "user", "content": "Speak, what art thou?"}]
    want_chat = ref.generate(chat_prompt({"messages": list(msgs)}, DEFAULT_CHAT_TEMPLATE),
                             SamplingParams(max_tokens=16))[0].text
    got_chat = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    assert got_chat.choices[0].message.content == want_chat


@pytest.mark.parametrize("fe", ["fe_agg", "fe_pd"])
def test_logprobs_penalties_and_structured_output(dyn, ref, fe):
    """Behind Dynamo too: logprobs (top 2) and penalties equal `LLM.generate`'s, aggregated and disaggregated;
    a json_schema response_format is followed."""
    import json

    import numpy as np

    c = client(getattr(dyn, fe))
    sp = dict(max_tokens=12, frequency_penalty=0.5, presence_penalty=0.25)
    want = ref.generate([HELD_OUT[0]], SamplingParams(**sp, logprobs=2))[0]
    got = c.completions.create(model=MODEL, prompt=HELD_OUT[0], temperature=0, logprobs=2, **sp).choices[0]
    assert got.text == want.text
    np.testing.assert_allclose(got.logprobs.token_logprobs, [t.logprob for t in want.logprobs], atol=2e-2)
    assert all(1 <= len(d) <= 2 for d in got.logprobs.top_logprobs)
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Art thou a king?"}],
                                  max_tokens=24, temperature=0, response_format={
                                      "type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert json.loads(r.choices[0].message.content)["answer"] in ("yes", "no"), r.choices[0].message.content


def test_pd_releases_the_prefill_pages_at_once(dyn):
    """The decode worker acknowledges its pull at the prefill worker (Dynamo sends none): the prefill lease ends
    right after, not at its 60 s expiry."""
    client(dyn.fe_pd).completions.create(model=MODEL, prompt=LONG[0], max_tokens=4, temperature=0)
    wait_drained([dyn.control("prefill"), dyn.control("decode")], timeout=5.0)
    assert "Tandem prefill" not in dyn.log("decode")


def test_n_choices_and_seeds(dyn, ref):
    r = client(dyn.fe_agg).completions.create(model=MODEL, prompt=HELD_OUT[1], max_tokens=12, temperature=0.8,
                                              seed=7, n=2, extra_body={"ignore_eos": True})
    got = [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]
    want = [ref.generate([HELD_OUT[1]], SamplingParams(max_tokens=12, temperature=0.8, seed=s, ignore_eos=True))[0].text
            for s in (7, 8)]
    assert got == want and got[0] != got[1]
    assert r.usage.completion_tokens == 24


def test_repeated_prompt_goes_to_the_worker_holding_it(dyn):
    """KV-aware routing on Tandem's KV events: each long prompt's second request lands where its blocks are (with
    two workers, chance alone would hit all three 1 time in 8)."""
    c = client(dyn.fe_agg)
    for p in LONG:
        first = c.completions.create(model=MODEL, prompt=p, max_tokens=2, temperature=0)
        assert first.usage.prompt_tokens_details is None or not first.usage.prompt_tokens_details.cached_tokens
    time.sleep(0.5)   # the stored events reach the router (published every 0.1 s)
    for p in LONG:
        again = c.completions.create(model=MODEL, prompt=p, max_tokens=2, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens > 0, p


def test_unsupported_option_is_refused(dyn):
    c = client(dyn.fe_agg)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="To be", max_tokens=4, extra_body={"min_p": 0.1})
    end = time.monotonic() + 5
    while not any("min_p=0.1" in dyn.log(w) for w in ("agg1", "agg2")):
        assert time.monotonic() < end, "no worker log names the refused option"
        time.sleep(0.1)


def test_client_disconnect_frees_every_page(dyn):
    addrs = [dyn.control("prefill"), dyn.control("decode")]
    with httpx.stream("POST", f"http://127.0.0.1:{dyn.fe_pd}/v1/completions", timeout=30.0,
                      json={"model": MODEL, "prompt": LONG[1], "max_tokens": 100, "temperature": 0, "stream": True,
                            "ignore_eos": True}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert stats(addrs[1])["pages"]["used"] > 0   # decoding, midway (~25 dispatches of >= 0.1 s to go)
    wait_drained(addrs, timeout=1.0)   # aborted at once, not run to its end


def test_kill_9_mid_stream_migrates(dyn, ref):
    """A worker killed mid-stream: Dynamo migrates the request (prompt + tokens so far) to the other worker, and the
    client's stream completes with the reference tokens."""
    prompt = HELD_OUT[2]
    want = ref.generate([prompt], SamplingParams(max_tokens=80, ignore_eos=True))[0].text
    addrs = {w: dyn.control(w) for w in ("agg1", "agg2")}
    text, killed = "", None
    stream = client(dyn.fe_agg).completions.create(model=MODEL, prompt=prompt, max_tokens=80, temperature=0,
                                                   stream=True, extra_body={"ignore_eos": True})
    for i, chunk in enumerate(stream):
        text += chunk.choices[0].text if chunk.choices else ""
        if killed is None and i == 2:
            busy = [w for w, a in addrs.items() if stats(a)["load"]["running"] > 0]
            assert len(busy) == 1, busy
            killed = busy[0]
            dyn.procs[killed].send_signal(signal.SIGKILL)
            dyn.procs[killed].wait(timeout=10)
    assert killed is not None
    assert text == want
