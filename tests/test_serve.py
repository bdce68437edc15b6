"""`mxq serve` on 127.0.0.1 with the official openai client: same text as the runtime, bad requests,
API key, queue limits, client disconnects, a bounded load test, and the CLI in a subprocess."""
from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import mxq

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
fixtures = pytest.importorskip("fixtures")  # tools/fixtures.py (conftest puts tools/ on sys.path)
from mxq.server.app import create_app  # noqa: E402 - needs the serve extra
from mxq.server.commands import listen  # noqa: E402

PROMPTS = ["Hello world", "Once upon a time, in a land far away,", "日本語 and ünïcode 🙂"]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """tiny-qwen2 (byte-level BPE, chat template, 256-token context) stored at fp16."""
    from mxq.converter import convert

    path = tmp_path_factory.mktemp("serve") / "tiny.mxq"
    convert(fixtures.ensure("tiny-qwen2"), path, bpw=16, configs="fp16", objective="frobenius", cache_dir=None)
    return path


@pytest.fixture(scope="module")
def reference(model_path):
    """The runtime used directly: what the server must reproduce."""
    with mxq.load(model_path) as model:
        yield model


class LiveServer:
    """create_app + uvicorn on a free 127.0.0.1 port in a thread; .model is the served LoadedModel."""

    def __init__(self, path, **options):
        self.model = mxq.load(path)
        self.app = create_app(self.model, "tiny", **options)
        self.engine = self.app.state.engine
        sock = listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def client(self, api_key="none", **options):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=api_key, **options)

    def request(self, method, path, body=None, headers=None):
        """Raw HTTP: (status, parsed JSON or text, headers). body: dict (sent as JSON) or bytes."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        raw = response.read().decode()
        conn.close()
        try:
            return response.status, json.loads(raw), response.headers
        except json.JSONDecodeError:
            return response.status, raw, response.headers

    def health(self, headers=None):
        status, body, _ = self.request("GET", "/health", headers=headers)
        assert status == 200, body
        return body

    def wait_idle(self, timeout=10):
        deadline = time.monotonic() + timeout
        while (health := self.health())["busy"] or health["waiting"]:
            assert time.monotonic() < deadline, health
            time.sleep(0.01)
        return health

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.model.close()


@pytest.fixture(scope="module")
def server(model_path):
    live = LiveServer(model_path)
    yield live
    live.close()


@pytest.fixture
def make_server(model_path):
    started = []

    def make(**options):
        started.append(LiveServer(model_path, **options))
        return started[-1]

    yield make
    for live in started:
        live.close()


def direct(model, prompt, n, chat=False, **sampling):
    return "".join(model.generate(prompt, max_new_tokens=n, chat=chat, **sampling))


def gate_worker(live, per_token_seconds=0.0):
    """Make the served model wait for the returned Event before its first token (and sleep between
    tokens): a busy worker on demand, independent of the machine's speed."""
    go = threading.Event()
    original = live.model.generate_ids

    def gated(*args, **kwargs):
        go.wait(timeout=30)
        for token in original(*args, **kwargs):
            time.sleep(per_token_seconds)
            yield token

    live.model.generate_ids = gated
    return go


# -- same text as the runtime ----------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_completions_greedy_equal_runtime(server, reference, stream):
    client = server.client()
    for prompt in PROMPTS:
        expected = direct(reference, prompt, 24, temperature=0.0)
        if stream:
            chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}))
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            used = chunks[-1].usage
        else:
            reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
            text, finish, used = reply.choices[0].text, reply.choices[0].finish_reason, reply.usage
        assert text == expected
        stats = reference.last_stats
        assert finish == ("stop" if stats.stop_reason == "eos" else "length")
        assert (used.prompt_tokens, used.completion_tokens) == (stats.prompt_tokens, stats.new_tokens)
        assert used.total_tokens == used.prompt_tokens + used.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_equal_runtime_chat(server, reference, stream):
    client = server.client()
    for prompt in PROMPTS[:2]:
        expected = direct(reference, prompt, 20, chat=True, temperature=0.0)
        messages = [{"role": "user", "content": prompt}]
        if stream:
            chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                                         temperature=0, stream=True))
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
        else:
            reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
            assert reply.choices[0].message.role == "assistant"
            assert reply.usage.prompt_tokens == len(reference.tokenizer.encode_chat(prompt))
            text = reply.choices[0].message.content
        assert text == expected


def test_sentencepiece_model_greedy_equal_runtime(tmp_path):
    """tiny-llama: a sentencepiece tokenizer (leading-space pieces, byte fallback) and a 32000 vocab."""
    from mxq.converter import convert

    path = tmp_path / "llama.mxq"
    convert(fixtures.ensure("tiny-llama"), path, bpw=16, configs="fp16", objective="frobenius", cache_dir=None)
    live = LiveServer(path)
    try:
        client = live.client()
        with mxq.load(path) as model:
            for prompt in PROMPTS:
                expected = direct(model, prompt, 16, temperature=0.0)
                reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0)
                chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                                   stream=True)
                assert reply.choices[0].text == "".join(c.choices[0].text for c in chunks) == expected
            expected = direct(model, PROMPTS[0], 16, chat=True, temperature=0.0)
            reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                   max_tokens=16, temperature=0)
            assert reply.choices[0].message.content == expected
    finally:
        live.close()


def test_chat_renders_every_message_with_the_template(server, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "more"}]}]
    flat = [{**m, "content": m["content"] if isinstance(m["content"], str) else "Tell me more"} for m in messages]
    ids = reference.tokenizer.encode(reference.tokenizer.render_chat(flat), add_bos=False)
    stream = reference.tokenizer.stream(ids)
    expected = "".join(stream.push(t) for t in reference.generate_ids(ids, 12)) + stream.flush()
    reply = server.client().chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected and reply.usage.prompt_tokens == len(ids)


def test_stop_text_holds_back_a_possible_stop_string():
    from mxq.server.engine import StopText

    stop = StopText(["END", "xyz"])
    assert [stop.push(p) for p in ("abc E", "N", "D tail")] == ["abc", " ", ""] and stop.stopped
    stop = StopText(["END"])
    assert [stop.push(p) for p in ("aEN", "x")] + [stop.flush()] == ["a", "E", "Nx"] and not stop.stopped
    assert StopText([]).push("all of it") == "all of it"


def test_seeded_sampling_equal_runtime(server, reference):
    options = dict(temperature=0.9, top_p=0.95, seed=7)
    expected = direct(reference, PROMPTS[1], 30, top_k=40, **options)
    reply = server.client().completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=30,
                                               extra_body={"top_k": 40}, **options)
    assert reply.choices[0].text == expected
    other = direct(reference, PROMPTS[1], 30, top_k=40, temperature=0.9, top_p=0.95, seed=8)
    assert other != expected  # the seed matters, so the equality above is not luck


def test_token_id_prompt_and_one_element_list(server, reference):
    ids = reference.tokenizer.encode(PROMPTS[0])
    expected = direct(reference, PROMPTS[0], 10, temperature=0.0)
    client = server.client()
    for prompt in (ids, [PROMPTS[0]], [ids]):
        assert client.completions.create(model="x", prompt=prompt, max_tokens=10, temperature=0).choices[0].text \
            == expected


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_the_text(server, reference, stream):
    full = direct(reference, PROMPTS[1], 40, temperature=0.0)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop.strip() and len(full) > 8, full
    expected = full[:full.index(stop)]
    client = server.client()
    for stops in (stop, ["never-appears", stop]):
        if stream:
            chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=40, temperature=0,
                                                    stop=stops, stream=True))
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            reply = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=40, temperature=0,
                                              stop=stops)
            text, finish = reply.choices[0].text, reply.choices[0].finish_reason
        assert (text, finish) == (expected, "stop")


def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert server.client().models.retrieve("tiny").id == "tiny"
    health = server.health()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["queue_size"] == 16


# -- bad requests: 4xx naming the field, and the server lives on ---------------------------------------
LONG = "word " * 400  # > 256 tokens
BAD = [  # (path, body, status, param, words in the message)
    ("/v1/completions", b'{"prompt": "hi", "max_tokens": ', 400, None, "not valid JSON"),
    ("/v1/completions", b"\xff\xfe", 400, None, "not valid JSON"),
    ("/v1/completions", b"[" * 100000, 400, None, "nested too deeply"),
    ("/v1/completions", b'{"prompt": "hi", "seed": ' + b"9" * 5000 + b"}", 400, None, "not valid JSON"),
    ("/v1/completions", {"prompt": "hi", "stop": ["s%d" % i for i in range(17)]}, 400, "stop", "at most 16"),
    ("/v1/completions", {"prompt": "hi", "stop": "x" * 257}, 400, "stop", "longest 257"),
    ("/v1/completions", {"prompt": "hi \udcff"}, 400, "prompt", "not valid UTF-8: byte 0xff"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages",
     "not valid UTF-8: lone surrogate U+D800"),
    ("/v1/completions", [1, 2], 400, None, "JSON object"),
    ("/v1/completions", {"max_tokens": 5}, 400, "prompt", "'prompt' must be"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", "must be an integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.0}, 400, "max_tokens", "must be an integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens", "at most"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 255}, 400, "max_tokens", "at most 254"),
    ("/v1/completions", {"prompt": LONG, "max_tokens": 1}, 400, "prompt", "context is 256"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "number"),
    ("/v1/completions", {"prompt": "hi", "temperature": True}, 400, "temperature", "number"),
    ("/v1/completions", {"prompt": "hi", "temperature": 3}, 400, "temperature", "[0.0, 2.0]"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p", "(0.0, 1.0]"),
    ("/v1/completions", {"prompt": "hi", "top_k": -1}, 400, "top_k", ">= 0"),
    ("/v1/completions", {"prompt": "hi", "seed": -3}, 400, "seed", ">= 0"),
    ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop", "string or an array"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream", "boolean"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n", "one choice"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 3}, 400, "logprobs", "not supported"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, "prompt", "outside the vocabulary"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "non-empty array"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages", "non-empty array"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role", "string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content", "text only"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages", "context"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6},
     400, "max_completion_tokens", "at most"),
]


@pytest.mark.parametrize("path, body, status, param, words", BAD, ids=range(len(BAD)))
def test_bad_requests_get_a_400_naming_the_field(server, path, body, status, param, words):
    got, reply, _ = server.request("POST", path, body)
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error
    assert server.health()["status"] == "ok"


def test_max_tokens_may_fill_the_context_exactly(server, reference):
    room = reference.context_length - len(reference.tokenizer.encode("hi"))
    status, reply, _ = server.request("POST", "/v1/completions", {"prompt": "hi", "max_tokens": room, "temperature": 0})
    assert status == 200 and reply["usage"]["total_tokens"] <= reference.context_length, reply


def test_oversized_body_is_refused(server):
    status, reply, _ = server.request("POST", "/v1/completions", b'{"prompt": "' + b"x" * (17 << 20) + b'"}')
    assert status == 413 and reply["error"]["code"] == "request_too_large"
    assert server.health()["status"] == "ok"


def test_routes_and_methods_are_openai_errors(server):
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                 ("POST", "/health", 405), ("GET", "/v1/models/other", 404)):
        got, reply, _ = server.request(method, path)
        assert got == status and reply["error"]["message"], (method, path, reply)


def test_unknown_fields_are_ignored_and_off_values_accepted(server, reference):
    body = {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "user": "me", "frobnicate": {"x": 1},
            "n": 1, "echo": False, "logprobs": None, "presence_penalty": 0, "logit_bias": {}, "model": "anything"}
    status, reply, _ = server.request("POST", "/v1/completions", body)
    assert status == 200 and reply["choices"][0]["text"] == direct(reference, PROMPTS[0], 8, temperature=0.0)
    assert reply["model"] == "tiny"


def test_openai_client_sees_a_bad_request_error(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model="tiny", prompt="hi", max_tokens=10**6)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": LONG}],
                                                stream=True)
    assert caught.value.body["code"] == "context_length_exceeded"


# -- API key --------------------------------------------------------------------------------------------
def test_api_key_is_required_on_every_endpoint(make_server):
    live = make_server(api_key="s3cret")
    for method, path, body in (("GET", "/health", None), ("GET", "/v1/models", None),
                               ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                               ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                               ("GET", "/v1/nothing", None)):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                        {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer s3cret2"}):
            status, reply, _ = live.request(method, path, body, headers)
            assert status == 401 and reply["error"]["code"] == "invalid_api_key", (path, headers, reply)
    assert live.health({"Authorization": "Bearer s3cret"})["status"] == "ok"
    assert live.health({"Authorization": "bearer s3cret"})["status"] == "ok"  # the scheme is case-insensitive
    with pytest.raises(openai.AuthenticationError):
        live.client(api_key="wrong").completions.create(model="tiny", prompt="hi", max_tokens=2)
    reply = live.client(api_key="s3cret").completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert reply.usage.completion_tokens >= 1


# -- serving behaviour ----------------------------------------------------------------------------------
def test_full_queue_answers_429_then_recovers(make_server):
    live = make_server(queue_size=2)
    go = gate_worker(live)
    client = live.client(max_retries=0)
    body = dict(model="tiny", prompt="hi", max_tokens=3, temperature=0)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(client.completions.create, **body)
        while not live.health()["busy"]:
            time.sleep(0.01)
        waiting = [pool.submit(client.completions.create, **body) for _ in range(2)]
        while live.health()["waiting"] < 2:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(**body)
        assert caught.value.body["code"] == "queue_full" and caught.value.response.headers["retry-after"] == "1"
        go.set()
        texts = {f.result().choices[0].text for f in [first] + waiting}
    assert len(texts) == 1  # the same greedy request, three times
    assert live.wait_idle()["status"] == "ok"


def read_events(response, count):
    """Read `count` SSE data lines from an http.client response."""
    seen = 0
    while seen < count:
        line = response.fp.readline()
        assert line, "the stream ended early"
        seen += line.startswith(b"data: ")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_stops_generation(make_server, stream):
    live = make_server()
    go = gate_worker(live, per_token_seconds=0.01)  # 250 tokens would take >= 2.5 s
    go.set()
    conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
    body = {"prompt": "hi", "max_tokens": 250, "temperature": 0, "stream": stream}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    if stream:
        response = conn.getresponse()
        assert response.status == 200
        read_events(response, 3)
    else:
        while live.health()["tokens_generated"] < 3:
            time.sleep(0.005)
    conn.sock.shutdown(2)
    conn.close()
    stopped = live.wait_idle(timeout=2)["tokens_generated"]  # well before the 2.5 s the request would take
    time.sleep(0.2)
    assert live.health()["tokens_generated"] == stopped < 100  # no more tokens for nobody
    reply = live.client().completions.create(model="tiny", prompt="hi", max_tokens=3)
    assert reply.usage.completion_tokens >= 1  # the worker serves the next request


def test_load_16_clients_20_requests_each(make_server, reference):
    live = make_server(queue_size=4)
    expected = {(p, chat): direct(reference, p, 6, chat=chat, temperature=0.0) for p in PROMPTS[:2]
                for chat in (False, True)}
    outcomes = {"ok": 0, "429": 0}
    lock = threading.Lock()

    def client_run(index):
        client = live.client(max_retries=0, timeout=60)
        for i in range(20):
            prompt, chat, stream = PROMPTS[(index + i) % 2], (index + i) % 3 == 0, i % 2 == 0
            try:
                if chat:
                    messages = [{"role": "user", "content": prompt}]
                    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                                           temperature=0, stream=stream)
                    text = ("".join(c.choices[0].delta.content or "" for c in reply) if stream
                            else reply.choices[0].message.content)
                else:
                    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                                      stream=stream)
                    text = "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text
                assert text == expected[(prompt, chat)], (prompt, chat, stream, text)
                kind = "ok"
            except openai.RateLimitError as error:
                assert error.status_code == 429 and error.body["code"] == "queue_full", error.body
                kind = "429"
            with lock:
                outcomes[kind] += 1

    with ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(client_run, i) for i in range(16)]:
            future.result()  # re-raises any wrong answer or unexpected error
    assert outcomes["ok"] + outcomes["429"] == 16 * 20 and outcomes["ok"] > 0, outcomes
    health = live.wait_idle()
    assert health["status"] == "ok" and health["waiting"] == 0


# -- the command line -------------------------------------------------------------------------------
def test_cli_serve_matches_cli_generate(model_path):
    mxq_cli = [sys.executable, "-m", "mxq.cli"]
    generated = subprocess.run(mxq_cli + ["generate", str(model_path), PROMPTS[1], "-n", "16"],
                               capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr
    process = subprocess.Popen(mxq_cli + ["serve", str(model_path), "--port", "0", "--log-level", "warning"],
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", line).group(1))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0)
        assert reply.choices[0].text + "\n" == generated.stdout
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: a graceful shutdown
        process.wait(timeout=20)
    rest = process.stderr.read()
    assert process.returncode == 130 and "Traceback" not in rest, rest


def test_cli_serve_errors_are_one_line(model_path, tmp_path):
    mxq_cli = [sys.executable, "-m", "mxq.cli", "serve"]
    missing = subprocess.run(mxq_cli + [str(tmp_path / "nope.mxq")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and missing.stderr.startswith("mxq: error: ") and "nope.mxq" in missing.stderr
    assert missing.stderr.strip().count("\n") == 0, missing.stderr
    with listen("127.0.0.1", 0) as busy:
        port = busy.getsockname()[1]
        taken = subprocess.run(mxq_cli + [str(model_path), "--port", str(port)], capture_output=True, text=True,
                               timeout=60)
    assert taken.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in taken.stderr
    assert taken.stderr.strip().count("\n") == 0, taken.stderr


def test_cli_serve_without_the_extra_says_how_to_install(model_path):
    code = "import sys; sys.modules['uvicorn'] = None; from mxq.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", code, "serve", str(model_path)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "pip install 'mxq[serve]'" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
