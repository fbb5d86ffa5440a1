"""Every request bounded before it runs, every bad value a 400 naming its field (never a 500), and the smaller
guards (issue 25's hostile-client findings: each of these failed before). One server on 127.0.0.1, a free
port, stopped by its fixture; every request bounded in time."""

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from test_finetune import micro_model, micro_weights_model  # noqa: F401  (fixtures)
from test_serving import DEFAULTS, PROMPTS, load_predictor

from glm.generation_settings import GenerationArguments
from glm.serving.app import ServeOptions, create_app
from glm.serving.middleware import HeaderTimeout
from glm.serving.protocol import MAX_STOP_CHARACTERS

KEY = "secret"


class Guarded:
    def __init__(self, model):
        HeaderTimeout.seconds = 1.0
        options = ServeOptions(model_name="micro", api_key=KEY, max_rows=16, max_request_rows=8, allowed_hosts=[])
        self.app = create_app(load_predictor(model), GenerationArguments(**DEFAULTS), options)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    http=HeaderTimeout))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Authorization": f"Bearer {KEY}"}

    def post(self, path, body, headers=None):
        content = body if isinstance(body, str) else json.dumps(body)
        return httpx.post(self.url + path, content=content, timeout=60,
                          headers={"Content-Type": "application/json", **(headers or self.headers)})


@pytest.fixture(scope="module")
def guarded(micro_weights_model):  # noqa: F811
    server = Guarded(micro_weights_model)
    yield server
    server.server.should_exit = True
    server.thread.join(30)
    HeaderTimeout.seconds = 10.0


def outcome(server, endpoint, kind):
    text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=10).text
    wanted = f'glm_requests_total{{endpoint="{endpoint}",outcome="{kind}"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted))


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "num_beams": 4000, "max_tokens": 2}, "num_beams"),  # peaked at 4.2 GiB
        ({"prompt": "x", "n": 5000, "temperature": 0.9}, "n"),  # passed 6 GiB in 22 s
        ({"prompt": ["x"] * 4, "num_beams": 3}, "num_beams"),  # 12 rows: would have run alone
    ],
)
def test_a_request_wider_than_its_rows_is_refused_naming_the_field(guarded, body, field):
    response = guarded.post("/v1/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and "over the server's 8 per request (--max_request_rows)" in error["message"]


@pytest.mark.parametrize(
    "path, body, field",
    [
        ("/v1/completions", '{"prompt": "x", "temperature": NaN}', "temperature"),
        ("/v1/completions", '{"prompt": "x", "temperature": Infinity}', "temperature"),
        ("/v1/completions", '{"prompt": "x", "temperature": 1e309}', "temperature"),
        ("/v1/completions", {"prompt": "x", "seed": -1, "temperature": 0.5}, "seed"),
        ("/v1/completions", {"prompt": "x", "top_k": 10**9}, "top_k"),
        ("/v1/completions", '{"prompt": "x", "length_penalty": -1e309}', "length_penalty"),
        ("/v1/completions", '{"prompt": "x", "length_penalty": NaN}', "length_penalty"),
        ("/v1/completions", {"prompt": "x", "length_penalty": 1000, "max_tokens": 4}, "length_penalty"),  # overflowed
        ("/v1/completions", {"prompt": "x", "length_penalty": -1000, "max_tokens": 4}, "length_penalty"),  # divided by 0
        ("/fill", {"text": "这款[MASK]", "length_penalty": 800}, "length_penalty"),
        ("/v1/completions", {"prompt": "a\ud800b"}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop": ["\ud800"]}, "stop"),
        ("/fill", {"text": "这款[MASK]\ud800"}, "text"),
        ("/score", {"context": "这款[MASK]", "choices": ["裙", "\ud800"]}, "choices"),
        ("/v1/completions", {"prompt": "x", "stop": ["s" * (MAX_STOP_CHARACTERS // 2 + 1)] * 2}, "stop"),
        ("/score", {"context": "这款[MASK]", "choices": ["裙"] * 65}, "choices"),
        ("/score", {"context": "这款[MASK]的[MASK]", "choices": ["裙", "裤"]}, "context"),  # which blank? evaluate refuses it
    ],
)
def test_a_bad_value_is_a_400_naming_its_field_never_a_500(guarded, path, body, field):
    if isinstance(body, dict):
        body = json.dumps(body)  # a lone surrogate as the \ud800 escape a JSON client sends
    response = guarded.post(path, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field, response.text
    assert outcome(guarded, path, "error") == 0


def test_score_waits_in_the_bounded_queue(guarded, monkeypatch):
    engine = guarded.app.state.engine
    monkeypatch.setattr(engine, "max_queue", 0)
    response = guarded.post("/score", {"context": "这款[MASK]", "choices": ["裙", "包"]})
    assert response.status_code == 503 and response.headers["Retry-After"] == "1"
    monkeypatch.undo()
    assert guarded.post("/score", {"context": "这款[MASK]", "choices": ["裙", "包"]}).status_code == 200


def test_the_smaller_guards(guarded):
    # HEAD on the GET routes
    for path in ("/health", "/"):
        assert httpx.head(guarded.url + path, timeout=10).status_code == 200
    # temperature 0 with an explicit greedy strategy
    body = {"prompt": PROMPTS[0], "max_tokens": 3, "temperature": 0, "decode_strategy": "greedy_search"}
    assert guarded.post("/v1/completions", body).status_code == 200
    # the Bearer scheme in any case (RFC 7235)
    assert guarded.post("/v1/completions", body, {"Authorization": f"bearer {KEY}"}).status_code == 200
    assert guarded.post("/v1/completions", body, {"Authorization": f"Basic {KEY}"}).status_code == 401
    # a Host of another name (DNS rebinding to 127.0.0.1) is refused; the loopback names are not
    refused = httpx.get(guarded.url + "/v1/models", headers={**guarded.headers, "Host": "evil.example"}, timeout=10)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "Host"
    for host in ("localhost", f"127.0.0.1:{guarded.port}", f"[::1]:{guarded.port}"):
        assert httpx.get(guarded.url + "/v1/models", headers={**guarded.headers, "Host": host}, timeout=10).status_code == 200


def test_a_request_head_that_never_completes_is_cut_off(guarded):
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        started = time.monotonic()
        sock.settimeout(5)
        assert sock.recv(100) == b""  # closed by the server
        assert time.monotonic() - started < 4


def test_a_stream_dropped_midway_counts_as_disconnected(guarded):
    before = outcome(guarded, "/v1/completions", "disconnected")
    body = {"prompt": PROMPTS[2], "max_tokens": 12, "min_tgt_length": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", guarded.url + "/v1/completions", json=body, headers=guarded.headers, timeout=60) as response:
        next(response.iter_lines())  # the first chunk, then the client leaves
    deadline = time.monotonic() + 20
    while outcome(guarded, "/v1/completions", "disconnected") == before:
        assert time.monotonic() < deadline, "the dropped stream was not counted as disconnected"
        time.sleep(0.1)
