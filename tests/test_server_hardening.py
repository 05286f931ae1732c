"""The server under hostile or unlucky input, over real HTTP on loopback: slow chat templates, big bodies, long
prompts and stop strings, bad logit_bias keys and schemas, disk faults and corrupt weights, clients that leave,
auth on every route but /health, a busy port, SIGTERM."""
from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from moepage.engine.sampling import StopMatcher
from moepage.server.json_schema import check_schema, validate
from server_support import (
    MODEL_ID, USER, ServeProcess, copy_model, load_engine, poke_float32, serving, small_demo, sse_events, tensor_span,
    wait_until,
)

LOOPING_TEMPLATE = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
                    "{{ messages[0].content }}")
EXPERT_BYTES = 110_592  # one prepared fp32 expert of the small demo shape (plan.expert_bytes_each)
CHAT = "/v1/chat/completions"


def chat_body(**over) -> dict:
    return {"model": MODEL_ID, "messages": USER, "max_tokens": 4, **over}


def error_of(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return small_demo(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def engine(demo_dir):
    eng = load_engine(demo_dir)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    with serving(engine, max_queue=1, sse_ping_seconds=0.2) as served:
        yield served


@pytest.fixture(scope="module")
def looping_dir(demo_dir, tmp_path_factory):
    path = copy_model(demo_dir, tmp_path_factory.mktemp("looping") / "model")
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(LOOPING_TEMPLATE)
    return path


# ---- the event loop stays free ---------------------------------------------------------------------------
def test_a_looping_template_times_out_while_health_answers(looping_dir):
    engine = load_engine(looping_dir)
    try:
        with serving(engine, template_timeout_seconds=1.5) as (url, _):
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                t0 = time.monotonic()
                slow = pool.submit(httpx.post, url + CHAT, json=chat_body(), timeout=30)
                time.sleep(0.2)
                latencies = []
                while not slow.done():
                    t = time.monotonic()
                    assert httpx.get(url + "/health", timeout=5).status_code == 200
                    latencies.append(time.monotonic() - t)
                    time.sleep(0.05)
                r, elapsed = slow.result(), time.monotonic() - t0
            assert latencies and max(latencies) < 1.0, latencies
            assert r.status_code == 500 and elapsed < 1.5 + 3.0, (r.status_code, elapsed)
            err = error_of(r)
            assert err["code"] == "chat_template_timeout" and err["type"] == "server_error"
            assert "chat_template.jinja" in err["message"] and "1.5 s" in err["message"]
            cpu = psutil.Process()
            time.sleep(0.3)
            before = sum(cpu.cpu_times()[:2])
            time.sleep(1.0)
            assert sum(cpu.cpu_times()[:2]) - before < 0.5  # the rendering stopped burning CPU
    finally:
        engine.close()


def test_sigterm_stops_serve_while_a_template_loops(looping_dir):
    with ServeProcess([looping_dir, "--served-model-name", MODEL_ID, "--template-timeout", "60", "--ctx-size", "256"]) \
            as p, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(httpx.post, p.url + CHAT, json=chat_body(), timeout=30)
        time.sleep(0.5)
        t = time.monotonic()
        assert httpx.get(p.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - t < 1.0
        assert not slow.done()
        p.proc.send_signal(signal.SIGTERM)
        t = time.monotonic()
        p.proc.wait(timeout=15)
        assert time.monotonic() - t < 5.0
        try:
            slow.result()
        except httpx.HTTPError:
            pass


# ---- memory bounded by the request ---------------------------------------------------------------------------
def test_body_over_the_limit_is_413(server):
    url, app = server
    limit = app.state.max_request_bytes
    assert limit == 1 << 20  # max(1 MiB, 16 bytes x 512 context tokens)
    big = b'{"messages": [{"role": "user", "content": "' + b"a" * limit + b'"}]}'
    headers = {"content-type": "application/json"}
    for path in (CHAT, "/v1/completions", "/tokenize"):
        r = httpx.post(url + path, content=big, headers=headers, timeout=30)
        assert r.status_code == 413, (path, r.text)
        err = error_of(r)
        assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
        assert str(limit) in err["message"] and "--max-request-bytes" in err["message"]

    def chunked():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = httpx.post(url + "/tokenize", content=chunked(), headers=headers, timeout=30)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    r = httpx.post(url + CHAT, content=b" " * (20 << 20), headers=headers, timeout=30)
    assert r.status_code == 413
    assert httpx.get(url + "/health").status_code == 200


def words(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    vocab = ["the", "model", "pages", "experts", "from", "disk", "while", "serving", "tokens", "quickly"]
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(vocab)
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n_chars]


def test_near_limit_request_is_refused_early_and_memory_comes_back(server):
    url, app = server
    text = words(app.state.max_request_bytes - 4096)
    proc = psutil.Process()
    before = proc.memory_info().rss
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        t = time.monotonic()
        r = httpx.post(url + CHAT, json=chat_body(messages=[{"role": "user", "content": text}]), timeout=30)
        elapsed = time.monotonic() - t
        r2 = httpx.post(url + "/tokenize", json={"prompt": text}, timeout=30)
    finally:
        done.set()
        sampler.join()
    time.sleep(0.3)
    after = proc.memory_info().rss
    for resp in (r, r2):
        assert resp.status_code == 400, resp.text
        err = error_of(resp)
        assert err["code"] == "context_length_exceeded" and "more than 511" in err["message"]
    assert elapsed < 3.0
    mib = 1 << 20
    assert max(peak) - before < 100 * mib, (before / mib, max(peak) / mib)
    assert after - before < 32 * mib, (before / mib, after / mib)


def test_a_prompt_near_the_context_is_counted_exactly(server, engine):
    url, _ = server
    fits, over = words(400), words(1000)
    assert len(engine.tokenizer.encode(fits)) < 500 and 512 < len(engine.tokenizer.encode(over)) < 1022
    r = httpx.post(url + "/v1/completions", json={"model": MODEL_ID, "prompt": fits, "max_tokens": 1})
    assert r.status_code == 200, r.text
    r = httpx.post(url + "/tokenize", json={"prompt": over})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    assert f"resulted in {len(engine.tokenizer.encode(over))} tokens" in error_of(r)["message"]


# ---- stop strings ---------------------------------------------------------------------------------------------
def test_stop_strings_are_capped(server):
    url, _ = server
    for stop in (["x" * 257], "y" * 200_000, [f"s{i}" for i in range(17)]):
        r = httpx.post(url + CHAT, json=chat_body(stop=stop), timeout=30)
        assert r.status_code == 400, r.text
        assert error_of(r)["param"] == "stop"
    r = httpx.post(url + CHAT, json=chat_body(stop=["x" * 256] * 16), timeout=30)
    assert r.status_code == 200, r.text


def brute_force(stops: list[str], pieces: list[str]):
    """The old matcher: search the whole held-back text again after each piece."""
    pending, out = "", []
    for text in pieces:
        pending += text
        hit = min((pending.find(s) for s in stops if s in pending), default=None)
        if hit is not None:
            return "".join(out) + pending[:hit], True
        keep = max((k for s in stops for k in range(1, len(s)) if pending.endswith(s[:k])), default=0)
        emit, pending = (pending[: len(pending) - keep], pending[len(pending) - keep:])
        out.append(emit)
    return "".join(out), False


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.text("abc", min_size=1, max_size=5), min_size=1, max_size=4),
       st.lists(st.text("abc", max_size=5), max_size=8))
def test_stop_matcher_finds_what_a_full_search_finds(stops, pieces):
    m, out = StopMatcher(stops), []
    for text in pieces:
        emit, hit = m.push(text)
        out.append(emit)
        if hit:
            break
    assert ("".join(out), hit if pieces else False) == brute_force(stops, pieces)


def test_stop_matcher_looks_at_each_character_once():
    stops = ["a" * 255 + chr(ord("b") + i) for i in range(16)]  # every tail of a run of a's may begin one
    m = StopMatcher(stops)
    t = time.perf_counter()
    for _ in range(20_000):
        emit, hit = m.push("a")
        assert not hit
    assert time.perf_counter() - t < 1.0
    assert m.pending == "a" * 255


# ---- client faults are 4xx, never 500 ---------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["²", "①", "୫", "9" * 5000, "-1", " 5", "5.0", "1e3"])
def test_logit_bias_keys_must_be_ascii_token_ids(server, key):
    url, _ = server
    r = httpx.post(url + CHAT, json=chat_body(logit_bias={key: 1}), timeout=30)
    assert r.status_code == 400, r.text
    assert error_of(r)["param"] == "logit_bias"


def nested_any_of(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"anyOf": [schema]}
    return schema


@pytest.mark.parametrize("stream", [False, True])
def test_deep_json_schema_is_400(server, stream):
    url, _ = server
    schema = '{"anyOf": [' * 480 + '{"type": "string"}' + ']}' * 480  # too deep for json.dumps to write
    fmt = '{"type": "json_schema", "json_schema": {"name": "deep", "schema": %s}}' % schema
    body = json.dumps(chat_body(stream=stream))[:-1] + ', "response_format": %s}' % fmt
    r = httpx.post(url + CHAT, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["param"] == "response_format" and "deeper than" in err["message"]


def test_schema_validation_never_recurses_past_its_limit():
    assert check_schema(nested_any_of(480)) and check_schema(nested_any_of(10)) is None
    assert "deeper than" in validate("x", nested_any_of(480))
    assert validate("x", nested_any_of(10)) is None


# ---- disk faults and corrupt weights are server errors ---------------------------------------------------------
@pytest.fixture(scope="module")
def faulty(demo_dir, tmp_path_factory):
    """A server whose experts page in (a 3-expert cache of 16) from a copy of the demo model the test may damage."""
    path = copy_model(demo_dir, tmp_path_factory.mktemp("faulty") / "model")
    engine = load_engine(path, expert_cache_bytes=3 * EXPERT_BYTES)
    with serving(engine) as (url, _):
        yield url, os.path.join(path, "model.safetensors")
    engine.close()


def test_expert_read_failure_is_503_and_the_server_keeps_serving(faulty):
    url, weights = faulty
    with open(weights, "rb") as f:
        original = f.read()
    st_ = os.stat(weights)
    start, _, _ = tensor_span(weights, "lm_head.weight")
    try:
        os.truncate(weights, start)  # every expert's bytes gone
        r = httpx.post(url + CHAT, json=chat_body(), timeout=30)
        assert r.status_code == 503, r.text
        err = error_of(r)
        assert err["code"] == "expert_read_failed" and err["type"] == "server_error"
        assert "model.safetensors" in err["message"]
        with httpx.Client(timeout=30) as c, c.stream("POST", url + CHAT, json=chat_body(stream=True)) as s:
            assert s.status_code == 200
            events = sse_events(s)
        errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
        assert events[-1] == "[DONE]" and errors and errors[0]["code"] == "expert_read_failed"
        assert httpx.get(url + "/health").json()["requests_running"] == 0
    finally:
        with open(weights, "r+b") as f:
            f.write(original)
        os.utime(weights, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    r = httpx.post(url + CHAT, json=chat_body(), timeout=30)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def corrupt(demo_dir, tmp_path_factory):
    path = copy_model(demo_dir, tmp_path_factory.mktemp("corrupt") / "model")
    poke_float32(os.path.join(path, "model.safetensors"), "lm_head.weight", float("nan"))
    engine = load_engine(path)
    with serving(engine) as (url, _):
        yield url
    engine.close()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_are_a_named_server_error(corrupt, temperature):
    r = httpx.post(corrupt + CHAT, json=chat_body(temperature=temperature), timeout=30)
    assert r.status_code == 500, r.text
    err = error_of(r)
    assert err["code"] == "non_finite_logits" and err["type"] == "server_error"
    assert "non-finite logits" in err["message"] and "moepage verify" in err["message"]
    assert "probability tensor" not in err["message"]
    with httpx.Client(timeout=30) as c, \
            c.stream("POST", corrupt + CHAT, json=chat_body(temperature=temperature, stream=True)) as s:
        events = sse_events(s)
    assert [e["error"]["code"] for e in events if isinstance(e, dict) and "error" in e] == ["non_finite_logits"]


# ---- the queue ---------------------------------------------------------------------------------------------------
def test_queued_requests_whose_clients_left_give_their_slot_back(server, engine):
    url, app = server  # --max-queue 1

    def waiting():
        return httpx.get(url + "/health").json()["requests_waiting"]

    engine.lock.acquire()
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, url + CHAT, json=chat_body(), timeout=30)
            assert wait_until(lambda: app.state.worker.running == 1)
            with pytest.raises(httpx.ReadTimeout):  # queued, then the client gives up
                httpx.post(url + CHAT, json=chat_body(), timeout=0.5)
            assert wait_until(lambda: waiting() == 0, timeout=3)
            with httpx.Client(timeout=30) as c, c.stream("POST", url + CHAT, json=chat_body(stream=True)) as s:
                assert s.status_code == 200 and wait_until(lambda: waiting() == 1)
            assert wait_until(lambda: waiting() == 0, timeout=3)  # the stream's client left while it was queued
            queued = pool.submit(httpx.post, url + CHAT, json=chat_body(), timeout=30)
            assert wait_until(lambda: waiting() == 1)
            engine.lock.release()
            assert running.result().status_code == 200 and queued.result().status_code == 200
    finally:
        if engine.lock.locked():
            engine.lock.release()


# ---- auth and routes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("metrics_public", [False, True])
def test_api_key_guards_metrics_and_docs(engine, metrics_public):
    with serving(engine, api_keys=("sekret",), metrics_public=metrics_public) as (url, _):
        key = {"Authorization": "Bearer sekret"}
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/v1/models"):
            open_here = path == "/metrics" and metrics_public
            assert httpx.get(url + path).status_code == (200 if open_here else 401), path
            assert httpx.get(url + path, headers=key).status_code == 200, path
        assert "/v1/chat/completions" in httpx.get(url + "/openapi.json", headers=key).json()["paths"]
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.head(url + "/health").status_code == 200


def test_head_health_without_auth(server):
    url, _ = server
    r = httpx.head(url + "/health")
    assert r.status_code == 200 and not r.content


# ---- moepage serve ---------------------------------------------------------------------------------------------
def test_serve_on_a_busy_port_fails_before_loading(demo_dir):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        t = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "moepage.cli", "serve", demo_dir, "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode != 0
    assert len(lines) == 1, out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in lines[0] and "already in use" in lines[0]
    assert time.monotonic() - t < 60


def test_serve_hardening_flags():
    from moepage.cli import build_parser
    from moepage.commands.serve import settings_from_args

    args = build_parser().parse_args(["serve", "m", "--max-request-bytes", "4MiB", "--metrics-public",
                                      "--template-timeout", "5"])
    s = settings_from_args(args, "m")
    assert (s.max_request_bytes, s.metrics_public, s.template_timeout_seconds) == (4 << 20, True, 5.0)
    s = settings_from_args(build_parser().parse_args(["serve", "m"]), "m")
    assert (s.max_request_bytes, s.metrics_public) == (None, False)
