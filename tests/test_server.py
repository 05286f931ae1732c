"""The server over real HTTP on loopback, driven by the real `openai` client (and httpx for raw cases)."""
from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from moepage.demo import DemoSpec, build_demo_model
from moepage.engine.engine import Engine, EngineConfig
from moepage.server.app import create_app
from moepage.server.runner import BackgroundServer
from moepage.server.settings import ServerSettings

MODEL_ID = "demo-test"
HERMES_PIECES = ('{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}')
XML_PIECES = ("<function=get_weather>", "<parameter=city>", "</parameter>", "</function>")
JSON_PIECES = ('{"city": "Paris"}',)
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
EXPERT_BYTES = 96 * 1024  # one prepared expert of the demo shape (fp32)


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    # Small lm_head: logits near 0, so logit_bias can steer the model (tool calls); extra tokens keep the
    # forced sequences free of repeats. A 6-expert cache (of 64) makes every request page experts.
    spec = DemoSpec(lm_head_scale=1e-3, extra_tokens=HERMES_PIECES + XML_PIECES + JSON_PIECES)
    path = build_demo_model(tmp_path_factory.mktemp("demo"), spec)
    eng = Engine.load(EngineConfig(model=path, ctx_size=512, threads=1, expert_cache_bytes=6 * EXPERT_BYTES))
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def server(engine):
    settings = ServerSettings(model_id=MODEL_ID, max_queue=4, sse_ping_seconds=0.2)
    app = create_app(engine, settings)
    with BackgroundServer(app) as url:
        yield url, app


@pytest.fixture(scope="session")
def url(server):
    return server[0]


@pytest.fixture(scope="session")
def app(server):
    return server[1]


@pytest.fixture(scope="session")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture()
def http(url):
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def forcing_bias(token_ids: list[int]) -> dict[str, float]:
    """logit_bias that makes greedy decoding with presence_penalty=2 and frequency_penalty=2 emit token_ids
    (all distinct) in order from a model whose logits are ~0: each emitted token drops by 4, so a bias
    ladder with total span under 4 always puts the next unused token on top."""
    assert len(set(token_ids)) == len(token_ids), "the forced sequence must not repeat a token"
    step = 3.0 / max(1, len(token_ids) - 1)
    return {str(t): 100.0 - i * step for i, t in enumerate(token_ids)}


def forced(engine, text: str) -> dict:
    ids = engine.tokenizer.encode(text) + [engine.tokenizer.eos_id]
    return dict(temperature=0, presence_penalty=2, frequency_penalty=2, logit_bias=forcing_bias(ids),
                max_tokens=len(ids) + 5)


def metric_values(text: str) -> dict[str, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k not in ("model", "source")}
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else "")
            out[key] = out.get(key, 0.0) + s.value
    return out


def wait_until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# ---- basics ----------------------------------------------------------------------------------------
def test_models_and_health(client, http, engine):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    assert http.get("/health").json()["status"] == "ok"


def test_chat_non_streamed(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=8, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.model == MODEL_ID
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content


def test_chat_streamed_matches_non_streamed_and_reports_usage(client):
    kw = dict(model=MODEL_ID, messages=USER, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=3, stream=True))
    assert all(c.choices for c in chunks)


def test_stop_string_cuts_output(client):
    kw = dict(model=MODEL_ID, messages=USER, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw, max_tokens=20).choices[0].message.content
    cut = next(i for i in range(len(full) // 2, len(full) - 3) if full[i:i + 3].strip())
    stop = full[cut:cut + 3]
    r = client.chat.completions.create(**kw, max_tokens=20, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]


def test_seed_reproducible(client):
    kw = dict(model=MODEL_ID, messages=USER, max_tokens=10, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(**kw, seed=42).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=42).choices[0].message.content
    c = client.chat.completions.create(**kw, seed=43).choices[0].message.content
    assert a == b and a != c


def test_n_choices_and_logprobs(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=4, n=2, seed=1, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 8
    for c in r.choices:
        assert len(c.logprobs.content) == 4
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in c.logprobs.content)


def test_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=USER, max_completion_tokens=2,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 2


# ---- tool calls ------------------------------------------------------------------------------------
HERMES_CALL = "Sure.<tool_call>" + "".join(HERMES_PIECES) + "</tool_call>"
XML_CALL = "<tool_call><function=get_weather><parameter=city>Paris</parameter></function></tool_call>"


@pytest.mark.parametrize("text, content", [(HERMES_CALL, "Sure."), (XML_CALL, None)])
def test_tool_call_parsed_streamed_and_not(client, engine, text, content):
    kw = dict(model=MODEL_ID, messages=USER, tools=TOOLS, **forced(engine, text))
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.content == content
    assert len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert all(d.index == 0 for d in deltas)
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == (content or "")
    assert "<tool_call" not in streamed and "<function" not in streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def rendered_prompt(http, messages, tools=None) -> list[int]:
    body = {"messages": messages} | ({"tools": tools} if tools else {})
    return http.post("/tokenize", json=body).json()["tokens"]


def test_tool_choice_none_offers_tools_but_does_not_parse(client, http, engine):
    # As vLLM by default: the tools are in the prompt, the output is not parsed for calls.
    with_tools, without = rendered_prompt(http, USER, TOOLS), rendered_prompt(http, USER)
    assert len(with_tools) > len(without)
    r = client.chat.completions.create(model=MODEL_ID, messages=USER, tools=TOOLS, tool_choice="none",
                                       **forced(engine, HERMES_CALL))
    assert r.usage.prompt_tokens == len(with_tools)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "stop"
    assert "get_weather" in r.choices[0].message.content


TWO_TOOLS = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}] + TOOLS


@pytest.mark.parametrize("tool_choice, prefix, model_writes", [
    ("required", "<tool_call>\n", "".join(HERMES_PIECES) + "</tool_call>"),
    ({"type": "function", "function": {"name": "get_weather"}},
     '<tool_call>\n{"name": "get_weather", "arguments": ', '{"city": "Paris"}}</tool_call>'),
])
def test_tool_choice_forces_a_call_through_a_prompt_prefix(client, http, engine, tool_choice, prefix, model_writes):
    """The demo template is Hermes/Qwen JSON: the opening (and the name) are appended to the prompt; the model
    writes only the rest, and the parser, fed the prefix first, returns the call."""
    prompt = rendered_prompt(http, USER, TWO_TOOLS) + engine.tokenizer.encode(prefix, add_special_tokens=False)
    kw = dict(model=MODEL_ID, messages=USER, tools=TWO_TOOLS, tool_choice=tool_choice, **forced(engine, model_writes))
    r = client.chat.completions.create(**kw)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].type == "function" and deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.prompt_tokens == len(prompt)


def test_tool_result_round_trip(client, http, engine):
    first = client.chat.completions.create(model=MODEL_ID, messages=USER, tools=TOOLS, **forced(engine, HERMES_CALL))
    call = first.choices[0].message.tool_calls[0]
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    rendered = http.post("/tokenize", json={"messages": messages, "tools": TOOLS}).json()["tokens"]
    text = engine.tokenizer.decode(rendered, skip_special_tokens=False)
    assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in text
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    r = client.chat.completions.create(model=MODEL_ID, messages=messages, tools=TOOLS, max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(rendered)


# ---- completions, tokenize ---------------------------------------------------------------------------
def test_completions_echo_logprobs_and_token_prompts(client, engine):
    r = client.completions.create(model=MODEL_ID, prompt="def add(a, b):", max_tokens=5, echo=True, logprobs=2,
                                  extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text.startswith("def add(a, b):")
    assert len(c.logprobs.tokens) == 5 and len(c.logprobs.top_logprobs[0]) <= 2
    assert c.logprobs.text_offset[0] == len("def add(a, b):")
    ids = engine.tokenizer.encode("hello world")
    r2 = client.completions.create(model=MODEL_ID, prompt=[ids, ids[:1]], max_tokens=2, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert [ch.index for ch in r2.choices] == [0, 1]
    assert r2.usage.prompt_tokens == len(ids) + 1
    text = client.completions.create(model=MODEL_ID, prompt="hello world", max_tokens=2, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    assert r2.choices[0].text == text


def test_completions_stream_with_usage(client):
    chunks = list(client.completions.create(model=MODEL_ID, prompt="x = ", max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"


def test_fim_suffix_uses_fim_tokens(client, engine):
    tk = engine.tokenizer
    r = client.completions.create(model=MODEL_ID, prompt="def f(x):\n    ", suffix="\n    return y", max_tokens=3,
                                  extra_body={"ignore_eos": True})
    expected = len(tk.encode("def f(x):\n    ")) + len(tk.encode("\n    return y")) + 3
    assert r.usage.prompt_tokens == expected


def test_tokenize_detokenize(http, engine):
    r = http.post("/tokenize", json={"prompt": "hello world"}).json()
    assert r["tokens"] == engine.tokenizer.encode("hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 512
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "hello world"


# ---- errors --------------------------------------------------------------------------------------------
def post(http, path, body, raw=False):
    if raw:
        return http.post(path, content=body, headers={"content-type": "application/json"})
    return http.post(path, json=body)


BAD_CHAT = [
    ("{not json", 400, None),
    ('["a list"]', 400, None),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": USER, "max_tokens": -1}, 400, "max_tokens"),
    ({"messages": USER, "max_tokens": "ten"}, 400, "max_tokens"),
    ('{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}', 400, "temperature"),
    ('{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', 400, "top_p"),
    ({"messages": USER, "temperature": 7}, 400, "temperature"),
    ({"messages": USER, "top_p": 0}, 400, "top_p"),
    ({"messages": USER, "n": 1000}, 400, "n"),
    ({"messages": USER, "n": 50}, 400, "n"),
    ({"messages": USER, "logit_bias": {"99999999": 5}}, 400, "logit_bias"),
    ({"messages": USER, "logit_bias": {"cat": 5}}, 400, "logit_bias"),
    ({"messages": USER, "logit_bias": {"5": 500}}, 400, "logit_bias[5]"),
    ({"messages": USER, "stop": [""]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0]"),
    ({"messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400,
     "tool_choice"),
    ({"messages": USER, "tool_choice": "required"}, 400, "tool_choice"),
    ({"messages": USER, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, 400, "tool_choice"),
    ({"messages": USER, "model": "gpt-4o"}, 404, "model"),
]


@pytest.mark.parametrize("body, status, param", BAD_CHAT)
def test_chat_errors_in_openai_format(http, body, status, param):
    r = post(http, "/v1/chat/completions", body, raw=isinstance(body, str))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_route_and_method_errors(http):
    r = http.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_context_overflow_is_400_with_both_numbers(client, engine):
    long = "hello world " * 400
    n = len(engine.tokenizer.apply_chat_template([{"role": "user", "content": long}]))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": long}], max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in e.value.message and str(n) in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt=long, max_tokens=4)
    assert e.value.code == "context_length_exceeded"


def test_prompt_plus_max_tokens_over_context_is_cut_with_length(client, engine):
    """Only a prompt that leaves no room is a 400; max_tokens past the context is cut, finish_reason "length"."""
    ids = engine.tokenizer.encode("hello world")
    at_limit = (ids * 600)[:512]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_ID, prompt=at_limit, max_tokens=1)
    assert e.value.code == "context_length_exceeded" and "512" in e.value.message
    r = client.completions.create(model=MODEL_ID, prompt=at_limit[:-1], max_tokens=50, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 1
    messages = [{"role": "user", "content": "hello world " * 60}]
    n = len(engine.tokenizer.apply_chat_template(messages))
    assert 400 < n < 500
    kw = dict(model=MODEL_ID, messages=messages, max_tokens=400, extra_body={"ignore_eos": True})
    r = client.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.total_tokens) == (n, 512)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.total_tokens == 512


def test_suffix_with_echo_rejected(http):
    r = http.post("/v1/completions", json={"prompt": "a", "suffix": "b", "echo": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


# ---- queue, pings, cancellation ---------------------------------------------------------------------
def test_sse_headers_and_pings_arrive_while_engine_busy(url, engine):
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 2, "stream": True}
    engine.lock.acquire()
    released = False
    try:
        with httpx.Client(timeout=10) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = r.iter_lines()
            seen = []
            for line in lines:
                seen.append(line)
                if line.startswith(": ping"):
                    break
            assert not any('"content"' in x and '"content": ""' not in x for x in seen)
            engine.lock.release()
            released = True
            rest = list(lines)
            assert "data: [DONE]" in rest
    finally:
        if not released:
            engine.lock.release()


def test_queue_full_is_429_with_retry_after(url, app, engine):
    worker = app.state.worker
    saved = worker.max_queue
    worker.max_queue = 1
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 2}
    engine.lock.acquire()
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            a = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=30)
            assert wait_until(lambda: worker.running == 1)
            b = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=30)
            assert wait_until(lambda: worker.waiting == 1)
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
            engine.lock.release()
            assert a.result().status_code == 200 and b.result().status_code == 200
    finally:
        worker.max_queue = saved
        if engine.lock.locked():
            engine.lock.release()


def test_client_disconnect_cancels_stream(url, app, engine, http):
    before = metric_values(http.get("/metrics").text).get('moepage_requests_finished_total{finish_reason=cancelled}', 0)
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 450, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=10) as c, c.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break
    assert wait_until(lambda: app.state.worker.running == 0 and not engine.lock.locked(), timeout=10)
    assert engine.last_stats.completion_tokens < 450
    after = metric_values(http.get("/metrics").text)['moepage_requests_finished_total{finish_reason=cancelled}']
    assert after == before + 1


def test_client_disconnect_cancels_non_streamed_request_while_queued(url, app, engine, http):
    before = metric_values(http.get("/metrics").text).get('moepage_requests_finished_total{finish_reason=cancelled}', 0)
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 450, "ignore_eos": True}
    engine.lock.acquire()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=0.5)
        time.sleep(0.3)  # the server notices the closed socket and cancels the job
    finally:
        engine.lock.release()
    assert wait_until(lambda: app.state.worker.running == 0 and not engine.lock.locked(), timeout=10)
    after = metric_values(http.get("/metrics").text)['moepage_requests_finished_total{finish_reason=cancelled}']
    assert after == before + 1
    assert engine.last_stats.completion_tokens < 450


# ---- metrics ------------------------------------------------------------------------------------------
def test_metrics_parse_and_paging_counters_move(client, http):
    before = metric_values(http.get("/metrics").text)
    client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=6, extra_body={"ignore_eos": True})
    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    after = metric_values(r.text)
    assert all(name.startswith("moepage_") for name in after)
    for name in ("moepage_expert_cache_misses_total", "moepage_expert_read_bytes_total",
                 "moepage_expert_page_in_seconds_count", "moepage_expert_cache_evictions_total",
                 "moepage_generation_tokens_total", "moepage_prompt_tokens_total",
                 "moepage_time_to_first_token_seconds_count", "moepage_e2e_request_latency_seconds_count"):
        assert after[name] > before.get(name, 0), name
    assert after["moepage_generation_tokens_total"] - before.get("moepage_generation_tokens_total", 0) == 6
    assert after["moepage_expert_cache_capacity_bytes"] == 6 * EXPERT_BYTES
    assert after["moepage_expert_cache_used_bytes"] <= 6 * EXPERT_BYTES
    assert after["moepage_requests_running"] == 0 and after["moepage_requests_waiting"] == 0
    assert after["moepage_inter_token_latency_seconds_count"] - before.get("moepage_inter_token_latency_seconds_count", 0) == 5


# ---- auth and CORS --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def secured(engine):
    app = create_app(engine, ServerSettings(model_id=MODEL_ID, api_keys=("sekret",), cors_origins=["http://ok.test"]))
    with BackgroundServer(app) as url:
        yield url


def test_api_key_required(secured):
    bad = openai.OpenAI(base_url=secured + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.code == "invalid_api_key"
    assert httpx.get(secured + "/v1/models").status_code == 401
    good = openai.OpenAI(base_url=secured + "/v1", api_key="sekret", max_retries=0)
    assert good.models.list().data[0].id == MODEL_ID
    assert httpx.get(secured + "/health").status_code == 200


def test_cors_preflight(secured):
    r = httpx.options(secured + "/v1/chat/completions", headers={
        "Origin": "http://ok.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ok.test"
    r = httpx.options(secured + "/v1/chat/completions", headers={
        "Origin": "http://evil.test", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers


# ---- fuzz ----------------------------------------------------------------------------------------------
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                             st.dictionaries(st.text(max_size=8), c, max_size=3)),
                           max_leaves=8)
small_tokens = st.one_of(st.integers(-3, 3), st.text(max_size=3), st.floats(), st.booleans(), st.lists(json_scalars))
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"]),
                                 "content": st.one_of(st.text(max_size=20), json_values)},
                                optional={"tool_calls": json_values, "name": json_values})
CHAT_KEYS = ["model", "temperature", "top_p", "top_k", "min_p", "n", "stop", "seed", "logprobs", "top_logprobs",
             "presence_penalty", "frequency_penalty", "logit_bias", "tools", "tool_choice", "response_format",
             "stream", "stream_options", "stop_token_ids", "repetition_penalty", "user"]
chat_body = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, max_size=3), json_values), "max_tokens": small_tokens},
    optional={k: json_values for k in CHAT_KEYS} | {"model": st.sampled_from([MODEL_ID, "other", ""])})
completion_body = st.fixed_dictionaries(
    {"prompt": st.one_of(st.text(max_size=20), st.lists(st.integers(-2, 2000), max_size=4), json_values),
     "max_tokens": small_tokens},
    optional={k: json_values for k in ["suffix", "echo", "logprobs", "n", "best_of", "stop", "seed", "stream",
                                       "logit_bias", "temperature", "model"]})


@hsettings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]),
       chat=chat_body, completion=completion_body, raw=st.one_of(st.none(), st.binary(max_size=30)))
def test_fuzz_never_500(url, path, chat, completion, raw):
    body = chat if path in ("/v1/chat/completions", "/tokenize") else completion
    if path == "/detokenize":
        body = {"tokens": completion["prompt"]}
    with httpx.Client(base_url=url, timeout=30) as c:
        if raw is not None:
            r = c.post(path, content=raw, headers={"content-type": "application/json"})
        else:
            r = c.post(path, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text[:500], body)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["message"] and err["type"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert "data: [DONE]" in r.text
        assert '"server_error"' not in r.text, r.text[:500]


def test_server_still_serves_after_fuzz(client):
    assert client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=1).choices


def test_response_format_json_is_validated_not_constrained(http):
    body = {"model": MODEL_ID, "messages": USER, "max_tokens": 4, "ignore_eos": True,
            "response_format": {"type": "json_object"}}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_json_output"
    body["response_format"] = {"type": "json_schema"}
    assert http.post("/v1/chat/completions", json=body).json()["error"]["param"] == "response_format"


PLACE = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
         "additionalProperties": False}
SCHEMA_CASES = [
    (PLACE, None),
    ({**PLACE, "properties": {"city": {"type": "integer"}}}, "at $.city: expected integer, got string"),
    ({**PLACE, "required": ["city", "country"]}, "at $: missing required property 'country'"),
    ({"type": "object", "properties": {}, "additionalProperties": False}, "at $: property 'city' is not allowed"),
    ({"type": "object", "properties": {"city": {"enum": ["Rome", "Oslo"]}}}, 'at $.city: "Paris" is not one of'),
    ({"type": "array", "items": {"type": "string"}}, "at $: expected array, got object"),
]


def json_schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}


@pytest.mark.parametrize("schema, problem", SCHEMA_CASES)
def test_response_format_json_schema_is_validated(client, engine, schema, problem):
    kw = dict(model=MODEL_ID, messages=USER, response_format=json_schema_format(schema),
              **forced(engine, '{"city": "Paris"}'))
    if problem is None:
        r = client.chat.completions.create(**kw)
        assert json.loads(r.choices[0].message.content) == {"city": "Paris"}
        return
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(**kw)
    assert e.value.code == "json_schema_mismatch" and e.value.param == "response_format"
    assert problem in e.value.message and "validated, not constrained" in e.value.message


def test_response_format_violation_streamed_is_an_error_event_before_done(client, http, engine):
    schema = SCHEMA_CASES[1][0]
    body = dict(model=MODEL_ID, messages=USER, response_format=json_schema_format(schema), stream=True,
                stream_options={"include_usage": True}, **forced(engine, '{"city": "Paris"}'))
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["code"] == "json_schema_mismatch" and "at $.city: expected integer" in error["message"]
    chunks = [json.loads(d) for d in data[:-2]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == '{"city": "Paris"}'
    assert all(c["choices"] and c["choices"][0]["finish_reason"] is None for c in chunks)  # no finish, no usage
    with pytest.raises(openai.APIError) as e:
        list(client.chat.completions.create(**body))
    assert "at $.city: expected integer" in e.value.message
