"""The server: answers equal predict_generation.py's (alone, batched, joining mid-flight), the OpenAI API
through the real `openai` client and curl, streaming, bad input, limits, disconnects, metrics.

Every server here listens on 127.0.0.1 only, on a port the OS picks, and is stopped by its fixture."""

import concurrent.futures
import json
import re
import subprocess
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from test_finetune import micro_model, micro_weights_model  # noqa: F401  (fixtures)
from test_generation import IDS, model_with_seed, source

import predict_generation
import glm.packed_gemm
import glm.serving.engine
from glm.decoding_cache import DEAD_STEPS_KEPT, DecodingBatch
from glm.generation import GenerationConfig, GLMGenerator
from glm.generation_settings import GenerationArguments
from glm.model_runner import DecodingRows
from glm.prediction import BLANK, Predictor
from glm.search import advance_searches
from glm.serving.app import ServeOptions, create_app
from glm.serving.engine import Engine, QueueFull, Source, SourceListener
from glm.serving.protocol import CompletionRequest, decoding_config

# The server's defaults, as predict's flags: --src_length 40 --tgt_length 12, beam search 2 beams.
DEFAULTS = dict(decode_strategy="beam_search", num_beams=2, min_tgt_length=2, no_repeat_ngram_size=3, length_penalty=0.7)
PROMPTS = ["类型#裙*颜色#红色", "这款[MASK]的裙子，[sMASK]", "类型#上衣*材质#棉*风格#休闲*图案#条纹", "短"]
SETTINGS = {  # request fields -> predict flags
    "greedy": ({"temperature": 0, "min_tgt_length": 3}, ["--decode_strategy", "greedy_search", "--min_tgt_length", "3"]),
    "sampling": ({"temperature": 0.8, "top_k": 30, "seed": 7, "n": 2},
                 ["--decode_strategy", "sampling", "--temperature", "0.8", "--top_k", "30", "--seed", "7", "--num_return_sequences", "2"]),
    "beam": ({"num_beams": 3, "n": 2, "length_penalty": 1.0},
             ["--decode_strategy", "beam_search", "--num_beams", "3", "--num_return_sequences", "2", "--length_penalty", "1.0"]),
}  # fmt: skip


def load_predictor(model, prefix_path=None):
    return Predictor(model, GenerationArguments(**DEFAULTS), src_length=40, tgt_length=12, batch_size=1, prefix_path=prefix_path)


class Served:
    """An app on uvicorn in a thread, on 127.0.0.1 and a free port."""

    def __init__(self, model, prefix_path=None, prefixes=None, prompt=None, **options):
        self.predictor = load_predictor(model, prefix_path)
        if callable(prompt):  # made from the predictor, as server.py makes it
            prompt = prompt(self.predictor)
        self.app = create_app(self.predictor, GenerationArguments(**DEFAULTS), ServeOptions(model_name="micro", **options),
                              prefixes, prompt)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()

    def post(self, path, body, **kwargs):
        return httpx.post(self.url + path, json=body, timeout=60, **kwargs)

    def metric(self, line_start, headers=None):
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


@pytest.fixture(scope="module")
def served(micro_weights_model):  # noqa: F811
    server = Served(micro_weights_model)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def expected(micro_weights_model, tmp_path_factory):  # noqa: F811
    """predict_generation.py's rows for PROMPTS under each of SETTINGS, one prompt at a time (--batch_size 1)."""
    directory = tmp_path_factory.mktemp("predict")
    data = directory / "prompts.json"
    data.write_text("".join(json.dumps({"src": p}, ensure_ascii=False) + "\n" for p in PROMPTS), encoding="utf-8")
    rows = {}
    for name, (_, flags) in SETTINGS.items():
        output = directory / f"{name}.jsonl"
        predict_generation.main(["--model_name_or_path", micro_weights_model, "--data_file", str(data), "--output_file",
                                 str(output), "--batch_size", "1", "--src_length", "40", "--tgt_length", "12",
                                 "--num_beams", "2", "--min_tgt_length", "2", *flags])  # fmt: skip
        rows[name] = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    return rows


def predicted_texts(row, n):
    """What a completion's n choices must say: the answer (several blanks: the filled text), as predict;
    choice j of several blanks fills each with its j-th answer."""
    if n == 1:
        return [row.get("filled") or row["prediction"]]
    if "filled" not in row:
        return row["predictions"]
    texts = []
    for copy in range(n):
        answers = iter(blank[copy] for blank in row["predictions"])
        texts.append(BLANK.sub(lambda match: next(answers), row["src"]))
    return texts


@pytest.mark.parametrize("name", list(SETTINGS))
def test_concurrent_requests_answer_as_predict_does(served, expected, name):
    """Each prompt its own request, all at once: they decode batched, and every answer is predict's."""
    fields, _ = SETTINGS[name]
    n = fields.get("n", 1)
    steps_before = served.metric("glm_batch_rows_count")
    wide_before = steps_before - served.metric('glm_batch_rows_bucket{le="2.0"}')
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        responses = list(pool.map(lambda p: served.post("/v1/completions", dict(fields, prompt=p, max_tokens=12)), PROMPTS))
    for prompt, response, row in zip(PROMPTS, responses, expected[name]):
        assert response.status_code == 200, response.text
        assert [c["text"] for c in response.json()["choices"]] == predicted_texts(row, n), prompt
    wide_steps = served.metric("glm_batch_rows_count") - served.metric('glm_batch_rows_bucket{le="2.0"}') - wide_before
    assert wide_steps > 0  # some step decoded more than 2 rows: requests were batched together


def test_a_prompt_list_gives_n_choices_per_prompt_in_order(served, expected):
    fields, _ = SETTINGS["sampling"]
    response = served.post("/v1/completions", dict(fields, prompt=PROMPTS, max_tokens=12)).json()
    assert [c["index"] for c in response["choices"]] == list(range(2 * len(PROMPTS)))
    texts = [c["text"] for c in response["choices"]]
    assert texts == [t for row in expected["sampling"] for t in predicted_texts(row, 2)]
    assert response["usage"]["completion_tokens"] > 0


class Recorder(SourceListener):
    def __init__(self):
        self.result = None

    def finished(self, blanks):
        self.result = blanks

    def ended(self, reason):
        self.result = reason


def test_first_tokens_go_out_before_the_step_of_the_round_that_chose_them(micro_weights_model):  # noqa: F811
    """A new source's first token comes from its <|startofpiece|> pass: the engine hands it to the server
    (events_ready) before the round's batched step, not a step later."""
    predictor = load_predictor(micro_weights_model)
    config = decoding_config(CompletionRequest(prompt="", max_tokens=4, temperature=0), GenerationArguments(**DEFAULTS), 4, 128)
    events = []

    class Tokens(Recorder):
        def tokens(self, tokens):
            events.append("token")

    engine = Engine(predictor.generator)
    engine.on_step = lambda rows: events.append("step")
    engine.events_ready = lambda: events.append("ready")
    engine.submit([Source(predictor.builder.build(PROMPTS[0]).input_ids, config, Tokens())])
    engine.run_once()
    assert events[:4] == ["token", "ready", "step", "token"], events
    engine.stop(wait=False)
    while engine.run_once():
        pass


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sources_join_the_running_batch_and_leave_when_done(micro_weights_model, name):  # noqa: F811
    """The engine stepped by hand: one source alone for 3 steps, then three more join; every result equals
    GLMGenerator.generate on that source alone, and finished sources leave the batch at once."""
    fields, _ = SETTINGS[name]
    predictor = load_predictor(micro_weights_model)
    config = decoding_config(CompletionRequest(prompt="", max_tokens=12, **fields), GenerationArguments(**DEFAULTS), 12, 128)
    sources = [predictor.builder.build(prompt).input_ids for prompt in PROMPTS]
    alone = [predictor.generator.generate([ids], config)[0] for ids in sources]

    engine = Engine(predictor.generator)
    rows = []
    engine.on_step = rows.append
    listeners = [Recorder() for _ in PROMPTS]
    engine.submit([Source(sources[0], config, listeners[0])])
    for _ in range(3):
        engine.run_once()
    engine.submit([Source(ids, config, listener) for ids, listener in zip(sources[1:], listeners[1:])])
    while engine._live or engine._queue:
        engine.run_once()
    assert [listener.result for listener in listeners] == alone
    per_source = max(1, config.num_beams if name == "beam" else config.num_return_sequences)
    assert rows[0] == per_source and max(rows) == 4 * per_source  # joined the running batch
    assert rows[-1] < max(rows)  # and the batch shrank as sources finished
    # the engine's packed weights stay while it runs (where Paddle bundles MKL's packed GEMM)
    assert predictor.generator.runner.weights_packed == (glm.packed_gemm._mkl() is not None)
    engine.stop(wait=False)
    assert not engine.run_once()
    assert not predictor.generator.runner.weights_packed  # and are dropped when it stops


def test_strategies_beam_widths_and_lengths_share_one_forward_per_step(micro_weights_model, monkeypatch):  # noqa: F811
    """Greedy, sampling and two beam widths, at two max_tokens, all in the same steps (DecodingCacheGroup):
    one forward and one search call per step, every answer as generate alone gives it."""
    predictor = load_predictor(micro_weights_model)
    requests = [({"temperature": 0}, 12), ({"temperature": 0}, 8), ({"temperature": 0.7, "seed": 1, "n": 2}, 12),
                ({"num_beams": 3}, 12), ({"num_beams": 2, "n": 2}, 12)]  # fmt: skip
    work = []
    for (fields, tokens), prompt in zip(requests, PROMPTS + PROMPTS):
        config = decoding_config(CompletionRequest(prompt="", max_tokens=tokens, **fields), GenerationArguments(**DEFAULTS), 12, 128)
        ids = predictor.builder.build(prompt).input_ids
        work.append((ids, config, predictor.generator.generate([ids], config)[0]))
    engine = Engine(predictor.generator)
    rows, searched = [], []
    engine.on_step = rows.append
    monkeypatch.setattr(glm.serving.engine, "advance_searches",
                        lambda searches, logprobs: searched.append(len(searches)) or advance_searches(searches, logprobs))
    listeners = [Recorder() for _ in work]
    engine.submit([Source(ids, config, listener) for (ids, config, _), listener in zip(work, listeners)])
    while engine._live or engine._queue:
        engine.run_once()
    assert [listener.result for listener in listeners] == [alone for _, _, alone in work]
    assert max(rows) == 1 + 1 + 2 + 3 + 2  # every source's rows in one step
    assert max(searched) == len(work)  # and every source's search in one call (glm.search.advance_searches)
    assert len(searched) <= len(rows) + 2  # one per step (and one per round of starting blanks), not per source


def test_a_long_running_batch_widens_its_memory_and_drops_steps_no_source_sees(monkeypatch):
    """Sources joining a batch that has decoded for a while: a longer memory widens the shared one (left
    padding), and once every live source joined after DEAD_STEPS_KEPT steps, the columns of those steps are
    dropped. Every step's log-probabilities equal those of the source decoded alone (greedy answers of a
    random model hardly depend on what is attended; the log-probabilities do)."""
    generator = GLMGenerator(model_with_seed(7, initializer_range=0.3, max_sequence_length=128), IDS)
    dropped, steps = [], {}
    original_drop, original_rows_step, original_engine_step = DecodingBatch._drop_dead_steps, DecodingRows.step, Engine._step

    def recording_drop(batch):
        before = batch.steps
        original_drop(batch)
        dropped.append(before - batch.steps)

    def alone_step(rows, tokens):
        logprobs = original_rows_step(rows, tokens)
        steps.setdefault("alone", []).append(logprobs.copy())  # the search processes it in place
        return logprobs

    def engine_step(engine, batches, members):
        logprobs = original_engine_step(engine, batches, members)
        bounds = np.cumsum([0] + [member.copies for member in members])
        for member, start, end in zip(members, bounds[:-1], bounds[1:]):
            steps.setdefault(tuple(member.source.ids), []).append(logprobs[start:end].copy())
        return logprobs

    monkeypatch.setattr(DecodingBatch, "_drop_dead_steps", recording_drop)
    monkeypatch.setattr(DecodingRows, "step", alone_step)
    monkeypatch.setattr(Engine, "_step", engine_step)
    greedy = lambda tokens: GenerationConfig(decode_strategy="greedy_search", tgt_length=tokens, min_tgt_length=tokens)  # noqa: E731
    work = [(source(5), greedy(70)), (source(6, 7, 8, 9, 10, 11), greedy(40)), (source(12, 13, 14, 15, 16, 17, 18), greedy(10))]
    alone = []
    for ids, config in work:
        alone.append((generator.generate([ids], config)[0], steps.pop("alone")))
    engine = Engine(generator)
    listeners = [Recorder() for _ in work]
    engine.submit([Source(*work[0], listeners[0])])
    for _ in range(DEAD_STEPS_KEPT + 4):
        engine.run_once()
    engine.submit([Source(*work[1], listeners[1])])  # joins at step DEAD_STEPS_KEPT + 2, with a longer memory
    while listeners[0].result is None:
        engine.run_once()
    engine.submit([Source(*work[2], listeners[2])])  # joins alone with the second: the first's steps are dead
    while engine._live or engine._queue:
        engine.run_once()
    assert max(dropped) >= DEAD_STEPS_KEPT
    for (ids, _), listener, (answer, logprobs) in zip(work, listeners, alone):
        assert listener.result == answer
        served = steps[tuple(ids)]
        assert len(served) == len(logprobs)
        np.testing.assert_allclose(np.concatenate(served), np.concatenate(logprobs), atol=1e-4)


def test_a_prompt_that_needs_many_model_calls_before_a_step_is_decoded_right():
    """Three blanks of one token each: encode, <|startofpiece|>, the answer put into memory, ... six calls
    without a decoding step, more than a round runs in its passes; the answer is still generate's."""
    generator = GLMGenerator(model_with_seed(7, initializer_range=0.3), IDS)
    ids = [IDS.cls, 5, IDS.mask, 6, IDS.smask, 7, IDS.mask, IDS.eos]
    config = GenerationConfig(decode_strategy="greedy_search", tgt_length=1)
    alone = generator.generate([ids], config)[0]
    engine, listener = Engine(generator), Recorder()
    engine.submit([Source(ids, config, listener)])
    for _ in range(20):
        engine.run_once()
        if listener.result is not None:
            break
    assert listener.result == alone and len(alone) == 3


def test_engine_queue_bound_and_time_limit(micro_weights_model):  # noqa: F811
    predictor = load_predictor(micro_weights_model)
    engine = Engine(predictor.generator, max_rows=2, max_queue=1)
    config = GenerationArguments(**DEFAULTS).config(12)
    ids = predictor.builder.build(PROMPTS[0]).input_ids
    late, waiting = Recorder(), Recorder()
    engine.submit([Source(ids, config, late, deadline=time.monotonic() - 1)])
    with pytest.raises(QueueFull):
        engine.submit([Source(ids, config, waiting)])
    engine.run_once()
    assert late.result == "timeout"


def test_streamed_chunks_join_to_the_answer_through_the_openai_client(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["micro"]
    for fields in ({"temperature": 0, "extra_body": {"min_tgt_length": 5}}, {"temperature": 0.9, "seed": 3, "n": 2},
                   {"extra_body": {"num_beams": 3}}):
        extra = fields.pop("extra_body", {})
        whole = client.completions.create(model="micro", prompt=PROMPTS[1], max_tokens=12, extra_body=extra, **fields)
        chunks = list(client.completions.create(model="micro", prompt=PROMPTS[1], max_tokens=12, stream=True,
                                                extra_body=extra, **fields))  # fmt: skip
        n = fields.get("n", 1)
        for index in range(n):
            mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
            assert "".join(c.text for c in mine) == whole.choices[index].text
            assert mine[-1].finish_reason == whole.choices[index].finish_reason
        if "num_beams" in extra:  # beam search: one chunk, the decided answer
            assert len(chunks) == 1
        else:  # one chunk per generated token, the last with the finish reason
            assert len(chunks) >= whole.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="max_tokens: 500 exceeds the model's max_sequence_length 128"):
        client.completions.create(model="micro", prompt="x", max_tokens=500)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4", prompt="x")


def test_curl_streams_server_sent_events(served):
    body = json.dumps({"prompt": "类型#裙", "max_tokens": 6, "temperature": 0, "stream": True, "min_tgt_length": 6})
    result = subprocess.run(["curl", "-sN", "--max-time", "60", served.url + "/v1/completions", "-H",
                             "Content-Type: application/json", "-d", body], capture_output=True, text=True, timeout=90)  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [line[len("data: "):] for line in result.stdout.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "text_completion" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    whole = served.post("/v1/completions", dict(json.loads(body), stream=False)).json()["choices"][0]["text"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole


def test_stop_strings_end_the_answer_where_they_appear(served):
    fields = {"prompt": PROMPTS[2], "max_tokens": 12, "temperature": 0, "min_tgt_length": 12}
    whole = served.post("/v1/completions", fields).json()["choices"][0]["text"]
    stop = whole[3:5]
    cut = served.post("/v1/completions", dict(fields, stop=[stop])).json()["choices"][0]
    assert cut["text"] == whole[: whole.index(stop)] and cut["finish_reason"] == "stop"
    streamed = httpx.post(served.url + "/v1/completions", json=dict(fields, stop=stop, stream=True), timeout=60).text
    pieces = [json.loads(line[6:])["choices"][0]["text"] for line in streamed.split("\n\n") if line.startswith("data: {")]
    assert "".join(pieces) == cut["text"]


def test_fill_and_score(served, micro_weights_model, tmp_path):  # noqa: F811
    filled = served.post("/fill", {"text": PROMPTS[1], "max_tokens": 12, "decode_strategy": "greedy_search"}).json()
    assert len(filled["answers"]) == 2 and filled["prediction"] == filled["answers"]
    assert filled["filled"] == f"这款{filled['answers'][0]}的裙子，{filled['answers'][1]}"
    events = [line[6:] for line in httpx.post(served.url + "/fill", json={"text": PROMPTS[1], "max_tokens": 12, "stream": True,
              "decode_strategy": "greedy_search"}, timeout=60).text.split("\n\n") if line.startswith("data: ")]  # fmt: skip
    pieces = [json.loads(e) for e in events[:-2]]
    assert json.loads(events[-2])["filled"] == filled["filled"] and events[-1] == "[DONE]"
    assert ["".join(p["text"] for p in pieces if p["blank"] == b) for b in (0, 1)] == filled["answers"]
    # the request's n, as completions take it (not the server's num_return_sequences)
    sampled = {"text": "这款[MASK]的裙子", "n": 2, "temperature": 1.0, "seed": 3, "max_tokens": 4}
    several = served.post("/fill", sampled).json()
    completion = served.post("/v1/completions", dict(sampled, prompt=sampled.pop("text"))).json()
    assert several["predictions"] == [choice["text"] for choice in completion["choices"]]
    assert several["prediction"] == several["predictions"][0] and "predictions" not in filled

    import evaluate

    row = {"inputs_pretokenized": "这款百搭[MASK]，长裙款式灵动飘逸。", "choices_pretokenized": ["上衣", "裙", "裤子"], "label": 1}
    (tmp_path / "mc.json").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    evaluate.main(["--task", "multiple_choice", "--model_name_or_path", micro_weights_model, "--data_file",
                   str(tmp_path / "mc.json"), "--output_file", str(tmp_path / "r.json")])  # fmt: skip
    want = json.loads((tmp_path / "r.predictions.jsonl").read_text(encoding="utf-8"))
    got = served.post("/score", {"context": row["inputs_pretokenized"], "choices": row["choices_pretokenized"]}).json()
    assert [round(s, 6) for s in got["scores"]] == want["scores"] and got["best"] == want["prediction"]
    # scoring shares the served backbone: generation afterwards is unchanged (still in eval mode)
    assert served.post("/fill", {"text": PROMPTS[1], "max_tokens": 12, "decode_strategy": "greedy_search"}).json() == filled


@pytest.mark.parametrize(
    "body, status, message",
    [
        ('{"prompt": "x", ', 400, "body: not valid JSON"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens: Input should be a valid integer"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens: must be between 1 and 128"),
        ({"prompt": "x", "decode_strategy": "beam"}, 400, "decode_strategy: must be one of"),
        ({"prompt": "x", "n": 3}, 400, "n: cannot exceed num_beams (2) in beam search; got 3"),
        ({"prompt": "x", "temperature": -1}, 400, "temperature: must be positive"),
        ({"prompt": "x", "frequency_penalty": 1}, 400, "frequency_penalty: Extra inputs are not permitted"),
        ({"prompt": "长" * 60}, 400, "64 tokens after tokenization with [CLS], the blank and <|endoftext|>, over the server's src_length 40"),
        ({"prompt": []}, 400, "prompt: give 1 to 32 prompts"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop: at most 4"),
    ],
)
def test_bad_requests_are_one_line_4xx_and_the_server_stays_healthy(served, body, status, message):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(served.url + "/v1/completions", content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]["message"]
    assert message in error and "\n" not in error
    assert httpx.get(served.url + "/ready", timeout=10).status_code == 200


def test_a_client_leaving_mid_stream_frees_its_rows(served):
    engine = served.app.state.engine
    body = {"prompt": "类型#裙", "max_tokens": 120, "min_tgt_length": 120, "temperature": 0, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        assert engine.live_rows == 1
    deadline = time.monotonic() + 20
    while engine.live_rows and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.live_rows == 0 and not engine._live
    assert served.post("/v1/completions", {"prompt": "x", "max_tokens": 3}).status_code == 200


def test_metrics_health_and_the_page(served):
    served.post("/v1/completions", {"prompt": "x", "max_tokens": 3})
    text = httpx.get(served.url + "/metrics", timeout=10).text
    for name in ("glm_requests_total", "glm_generated_tokens_total", "glm_queue_depth", "glm_batch_rows_bucket",
                 "glm_time_to_first_token_seconds_bucket", "glm_request_latency_seconds_bucket", "glm_ready 1.0"):
        assert name in text
    assert served.metric('glm_requests_total{endpoint="/v1/completions",outcome="ok"}') >= 1
    assert httpx.get(served.url + "/health", timeout=10).json() == {"status": "ok"}
    page = httpx.get(served.url + "/", timeout=10)
    assert page.status_code == 200 and "/fill" in page.text and "http" not in page.text.replace(served.url, "")
    # The form starts from what the server serves: beam search, 2 beams, 12 tokens, min 2 (DEFAULTS).
    shown = json.loads(re.search(r"const SERVER_DEFAULTS = (\{.*?\});", page.text).group(1))
    assert shown == {"strategy": "beam_search", "max_tokens": 12, "min_tgt_length": 2, "num_beams": 2,
                     "length_penalty": 0.7, "no_repeat_ngram_size": 3, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
    # A browser's unprompted /favicon.ico is no client error.
    before = served.metric('glm_requests_total{endpoint="other",outcome="bad_request"}')
    assert httpx.get(served.url + "/favicon.ico", timeout=10).status_code == 204
    assert served.metric('glm_requests_total{endpoint="/favicon.ico",outcome="ok"}') == 1
    assert served.metric('glm_requests_total{endpoint="other",outcome="bad_request"}') == before


@pytest.fixture(scope="module")
def guarded(micro_weights_model):  # noqa: F811
    """A server with an API key, a 2000-byte body limit and a time limit every generation exceeds."""
    server = Served(micro_weights_model, api_key="sekrit", max_body_bytes=2000, request_timeout=1e-6)
    yield server
    server.stop()


def test_api_key_body_limit_time_limit_and_a_full_queue(guarded, monkeypatch):
    key = {"Authorization": "Bearer sekrit"}
    assert httpx.get(guarded.url + "/health", timeout=10).status_code == 200
    assert httpx.get(guarded.url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(guarded.url + "/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    assert httpx.get(guarded.url + "/v1/models", headers=key, timeout=10).status_code == 200
    too_large = guarded.post("/v1/completions", {"prompt": "x" * 3000}, headers=key)
    assert too_large.status_code == 413 and "body: larger than the server's limit of 2000 bytes" in too_large.text
    late = guarded.post("/v1/completions", {"prompt": "x", "max_tokens": 3}, headers=key)
    assert late.status_code == 504 and "limit" in late.json()["error"]["message"]

    def full(sources):
        raise QueueFull("64 requests are waiting")

    monkeypatch.setattr(guarded.app.state.engine, "submit", full)
    busy = guarded.post("/v1/completions", {"prompt": "x"}, headers=key)
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert guarded.metric('glm_requests_total{endpoint="/v1/completions",outcome="overloaded"}', key) == 1
    assert guarded.metric('glm_requests_total{endpoint="/v1/completions",outcome="timeout"}', key) == 1
