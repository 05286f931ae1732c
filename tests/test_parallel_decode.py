"""--parallel: several sequences decode in one step (engine/batch_step.py, server/worker.py) and each one's greedy
tokens equal the same request run alone: bf16 through the fused decode kernels (routing in the kernel, with the
multi-row kernels of csrc/bf16_rows.h for the attention, the routed experts and the lm_head, 12-bit and bf16; and a
shared expert with the router's logits), fully resident and paged under a small expert cache; over HTTP with concurrent
requests that join at different times; a newcomer's long prefill does not stop the others' decode; a client that
does not read its stream does not stall anyone."""
from __future__ import annotations

import concurrent.futures
import os
import shutil
import socket
import threading
import time

import httpx
import pytest

from moepage.demo import DemoSpec, build_demo_model, demo_model_path
from moepage.engine import batch_step
from moepage.engine.batch_step import decode_step
from moepage.engine.engine import Engine, EngineConfig
from moepage.engine.sampling import SamplingParams
from moepage.kernels import bf16_rows
from moepage.paging.bf16_12bit import PackedMatrix
from server_support import MODEL_ID, serving

SPEC = DemoSpec(layers=3, hidden=128, experts=8, top_k=2, vocab=400)
GREEDY = dict(temperature=0, ignore_eos=True)


def load(path, **over) -> Engine:
    cfg = dict(model=path, ctx_size=1024, threads=1, dtype="bfloat16", parallel=4, prefill_chunk=32)
    return Engine.load(EngineConfig(**{**cfg, **over}))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_demo_model(tmp_path_factory.mktemp("parallel"), SPEC)


@pytest.fixture(scope="module")
def bf16_dir(model_dir, tmp_path_factory):
    """The same model saved in bf16: its lm_head can be held in the 12-bit form (a float32 one stays plain bf16)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("parallel_bf16")
    for f in os.listdir(model_dir):
        if f != "model.safetensors" and os.path.isfile(os.path.join(model_dir, f)):
            shutil.copy(os.path.join(model_dir, f), out / f)
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    save_file({k: v.bfloat16() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def prompts(engine, n: int) -> list[list[int]]:
    texts = ["def read_file(path):", "The weather in Paris is", "int main(void) {", "#!/bin/sh\necho"]
    return [engine.tokenizer.encode(texts[i % 4] * (1 + i)) for i in range(n)]


def alone(engine, prompt, n) -> list[int]:
    return [s.token for s in engine.generate(prompt, SamplingParams(max_tokens=n, **GREEDY))]


def together(engine, ps, n, stagger: int) -> list[list[int]]:
    """Sequence i joins after i * stagger steps of the others; every step after the prefills is decode_step."""
    seqs, out = [], [[] for _ in ps]
    step = 0
    with engine.lock:
        while len(seqs) < len(ps) or any(not s.finished for s in seqs):
            if len(seqs) < len(ps) and step >= len(seqs) * stagger:
                s = engine.start(ps[len(seqs)], SamplingParams(max_tokens=n, **GREEDY))
                while not s.prefill_chunk():
                    pass
                out[len(seqs)].append(s.sample().token)
                seqs.append(s)
            ready = [s for s in seqs if s.pending is not None]
            if ready:
                for s, logits in zip(ready, decode_step(engine.model, [s.pending for s in ready],
                                                         [s.slot.kv for s in ready])):
                    s.feed(logits)
                    out[seqs.index(s)].append(s.sample().token)
            step += 1
    return out


@pytest.mark.parametrize("paged", [False, True])
def test_batched_steps_count_each_rows_expert_accesses_once(model_dir, paged):
    """Cache stats under batching: hits + misses = rows x top-k per MoE layer per step (the group's pin is not an
    access of its own), and misses are the experts read."""
    over = {"expert_cache_bytes": 3 * 3 * 128 * 64 * 2 + 4 * 4096, "preload": False} if paged else {}
    engine = load(model_dir, **over)
    try:
        ps = prompts(engine, 4)
        seqs = []
        with engine.lock:
            for p in ps:
                seqs.append(engine.start(p, SamplingParams(max_tokens=8, **GREEDY)))
                while not seqs[-1].prefill_chunk():
                    pass
                seqs[-1].sample()
            stats = engine.cache.stats
            for _ in range(4):
                hits, misses, reads = stats.hits, stats.misses, stats.bytes_read
                for s, logits in zip(seqs, decode_step(engine.model, [s.pending for s in seqs],
                                                       [s.slot.kv for s in seqs])):
                    s.feed(logits)
                    s.sample()
                accesses = len(seqs) * len(engine.args.moe_layers) * SPEC.top_k
                assert stats.hits - hits + stats.misses - misses == accesses
                assert (stats.misses - misses > 0) == (stats.bytes_read > reads)
                assert paged or stats.misses == misses
            for s in seqs:
                s.finish()
    finally:
        engine.close()


class RowCalls:
    """Counts the batched step's multi-row kernel calls that ran (returned rows, not None)."""

    def __init__(self, monkeypatch):
        self.ran: dict[str, int] = {}
        for name in ("attention_kernel", "experts_rows", "lm_head_rows"):
            monkeypatch.setattr(batch_step, name, self._counting(name, getattr(batch_step, name)))

    def _counting(self, name, fn):
        def call(*args, **kw):
            out = fn(*args, **kw)
            self.ran[name] = self.ran.get(name, 0) + (out is not None)
            return out
        return call


@pytest.mark.parametrize("which", ["routed_in_kernel", "bf16_lm_head", "shared_expert"])
@pytest.mark.parametrize("paged", [False, True])
def test_batched_decode_equals_each_sequence_alone(model_dir, bf16_dir, which, paged, monkeypatch):
    """Routed in the kernel: the rows' attention, routed experts and lm_head (12-bit, or bf16) each in one
    multi-row call (tests/test_bf16_rows.py); a shared expert: the experts row by row."""
    path = {"routed_in_kernel": bf16_dir, "bf16_lm_head": model_dir}.get(which) or demo_model_path()
    over = {"expert_cache_bytes": 3 * 3 * 128 * 64 * 2 + 4 * 4096, "preload": False} if paged else {}
    if paged and which == "shared_expert":
        over["expert_cache_bytes"] = 3 * 3 * 256 * 384 * 2 + 4 * 4096
    if which != "shared_expert":
        over["pack_lm_head"] = which == "routed_in_kernel"  # the 12-bit lm_head, or bf16
    engine = load(path, **over)
    try:
        assert engine.model._decode_kernel is not None  # the fused path, where the rounding could differ
        if which != "shared_expert":  # (the shipped demo model's lm_head is its embedding table: bf16)
            assert isinstance(engine.model.lm_head, PackedMatrix) == (which == "routed_in_kernel")
        ps = prompts(engine, 4)
        want = [alone(engine, p, 24) for p in ps]
        calls = RowCalls(monkeypatch)
        got = together(engine, ps, 24, stagger=3)
        assert got == want
        if bf16_rows.module() is not None:
            assert calls.ran["attention_kernel"] > 0 and calls.ran["lm_head_rows"] > 0
            assert (calls.ran.get("experts_rows", 0) > 0) == (which != "shared_expert")
        if paged:
            assert engine.plan.fraction_resident < 1.0 and engine.cache.stats.misses > 0
    finally:
        engine.close()


@pytest.fixture(scope="module")
def served(model_dir):
    engine = load(model_dir, prefix_cache=True)
    with serving(engine) as (url, app):
        yield url, app, engine
    engine.close()


def chat(url, content, n, stream=False, timeout=60):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": content}], "max_tokens": n,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)


def test_concurrent_requests_answer_as_sequential_ones(served):
    url, app, engine = served
    assert httpx.get(url + "/props").json()["total_slots"] == 4
    asks = [("Tell me about files " * k, 20 + 7 * k) for k in range(1, 6)]  # 5 requests for 4 slots: one waits
    sequential = [chat(url, c, n).json()["choices"][0]["message"]["content"] for c, n in asks]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        futures = []
        for c, n in asks:
            futures.append(pool.submit(chat, url, c, n))
            time.sleep(0.05)  # they join while the others decode
        concurrent_ = [f.result().json()["choices"][0]["message"]["content"] for f in futures]
    assert concurrent_ == sequential


@pytest.fixture(scope="module")
def served_paged(model_dir):
    """Under an expert budget, where a lone long prompt would prefill layer-major in one call."""
    engine = load(model_dir, prefix_cache=True, expert_cache_bytes=3 * 3 * 128 * 64 * 2 + 4 * 4096, preload=False)
    assert engine.plan.fraction_resident < 1.0
    with serving(engine) as (url, app):
        yield url, app, engine
    engine.close()


def test_a_long_prefill_does_not_stop_the_others_decode(served):
    check_prefill_interleaves(served[0])


def test_under_a_budget_a_long_prefill_still_steps_between_the_others_decode(served_paged):
    check_prefill_interleaves(served_paged[0])


def check_prefill_interleaves(url):
    arrivals: list[float] = []
    started = threading.Event()

    def stream():
        body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 600,
                "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=120) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    arrivals.append(time.perf_counter())
                    started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    t0 = time.perf_counter()
    r = chat(url, "the tool returns lines of a file " * 40, 1)  # hundreds of tokens: many chunks of 32
    t1 = time.perf_counter()
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 300
    t.join(120)
    during = sum(t0 < a < t1 for a in arrivals)
    assert during >= 10, f"{during} tokens of the running stream arrived during a {t1 - t0:.2f} s prefill"


def test_a_client_that_does_not_read_stalls_no_one(served):
    url, app, _ = served
    body = (b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2000, '
            b'"ignore_eos": true, "stream": true}' % MODEL_ID.encode())  # ~1000 tokens: the context's end
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.5)  # it is generating; its socket is never read
        t0 = time.perf_counter()
        r = chat(url, "What is a file?", 30, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 30
        assert time.perf_counter() - t0 < 20
        # the unread stream is still generating beside it, not before it (the finished request leaves the count
        # right after its last token is pushed, on the engine thread: allow that moment)
        deadline = time.perf_counter() + 1
        while app.state.worker.running > 1 and time.perf_counter() < deadline:
            time.sleep(0.01)
        if app.state.worker.running == 0:  # a fast machine: it reached the context's end meanwhile, not cancelled
            s.settimeout(30)
            data = b""
            while b"[DONE]" not in data and (part := s.recv(1 << 16)):
                data += part
            assert b'"finish_reason":"length"' in data.replace(b" ", b"")
        else:
            assert app.state.worker.running == 1


@pytest.mark.parametrize("parallel,want", [(1, "lru"), (4, "stale")])
def test_auto_policy_counts_a_batched_steps_experts(model_dir, parallel, want):
    """A cache that holds one token's experts (3 layers x top-2) but not four rows' picks LRU for one sequence and
    'stale' for --parallel 4, whose steps walk more experts than it holds (docs/agent-serving.md)."""
    each = 3 * SPEC.hidden * 64 * 2 + 3 * 4096  # PreparedExpert.nbytes_for at the demo's expert width 64
    engine = load(model_dir, parallel=parallel, expert_cache_bytes=12 * each, preload=False)
    try:
        capacity = engine.plan.expert_cache_bytes // engine.plan.expert_bytes_each
        per_token = len(engine.args.moe_layers) * SPEC.top_k
        assert per_token <= capacity < 4 * per_token
        assert engine.cache.policy.name == want
    finally:
        engine.close()
