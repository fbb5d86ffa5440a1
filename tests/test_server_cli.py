"""server.py as a user runs it: a process on 127.0.0.1 that serves, drains on SIGTERM and exits 0; its
mistakes in one line."""

import asyncio
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
from conftest import ROOT
from test_finetune import micro_model, micro_weights_model  # noqa: F401  (fixtures)

import server


@contextlib.contextmanager
def running_server(model, *flags):
    """server.py on 127.0.0.1 and a free port, with `flags`: (process, url); killed on the way out if still up."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "server.py"), "--model_name_or_path", model, "--port", "0",
         "--src_length", "40", "--tgt_length", "120", *flags],
        stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        url = next(line.split(" on ")[1].split()[0] for line in process.stderr if line.startswith("serving "))
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_finishes_the_stream_in_flight_refuses_new_connections_and_exits_0(micro_weights_model):  # noqa: F811
    with running_server(micro_weights_model, "--drain_seconds", "60") as (process, url):
        assert url.startswith("http://127.0.0.1:")
        body = {"prompt": "类型#裙", "max_tokens": 120, "min_tgt_length": 120, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        chunks = [json.loads(line[6:]) for line in [first] + rest[:-1]]
        assert rest[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert process.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)


def test_what_outlasts_the_drain_time_is_answered_shutting_down_not_cut_off(micro_weights_model):  # noqa: F811
    """SIGTERM with --drain_seconds shorter than the requests in flight: the engine ends them before uvicorn
    cancels their tasks, so a stream ends with an error event and [DONE] and a plain request gets the 503
    JSON (uvicorn's cancellation answered a plain-text 500 and cut streams mid-chunk)."""
    with running_server(micro_weights_model, "--drain_seconds", "1", "--max_batch_rows", "128", "--max_request_rows", "64") as (process, url):
        # 32 prompts x 2 beams, 120 tokens, decoding beside the stream (room for both): seconds on the micro model
        body = {"prompt": ["类型#裙"] * 32, "max_tokens": 120, "min_tgt_length": 120, "num_beams": 2}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            plain = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)
            with httpx.stream("POST", url + "/v1/completions", json=dict(body, stream=True, temperature=0, num_beams=1),
                              timeout=60) as response:  # fmt: skip
                lines = response.iter_lines()
                next(line for line in lines if line.startswith("data: "))
                process.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data: ")]
            answer = plain.result()
        assert rest[-1] == "data: [DONE]" and "shutting down" in json.loads(rest[-2][6:])["error"]["message"]
        assert answer.status_code == 503 and "shutting down" in answer.json()["error"]["message"]
        assert process.wait(60) == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model_name_or_path", "{tmp}/none"], "no such model directory"),
        (["--lora_path", "{tmp}"], "no lora_config.json"),  # adapters are verified as predict verifies them
        (["--max_queue", "0"], "--max_queue must be at least 1"),
        (["--port", "{busy}"], "cannot listen on 127.0.0.1:{busy}"),
        (["--decode_strategy", "beam"], "decode_strategy must be one of"),
        (["--port", "99999"], "--port must be between 0 and 65535; got 99999"),  # a traceback before
        (["--request_timeout", "nan"], "--request_timeout must be a finite number; got nan"),  # no timeout at all
    ],
)
def test_mistakes_are_one_line_and_exit_2(micro_weights_model, tmp_path, capsys, flags, message):  # noqa: F811
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        flags = [flag.format(tmp=tmp_path, busy=port) for flag in flags]
        with pytest.raises(SystemExit) as exit_info:
            server.main(["--model_name_or_path", micro_weights_model, "--src_length", "40", "--tgt_length", "12", "--min_tgt_length", "2", *flags])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message.format(busy=port) in errors[0]


def test_connections_on_the_listening_socket_send_without_nagle():
    """asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections whose socket says IPPROTO_TCP; on a
    socket made with protocol 0, a kept-alive response's body waited ~40 ms behind its headers (delayed ACK)."""
    listening = server.listening_socket("127.0.0.1", 0)

    async def accepted_nodelay():
        seen = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            seen.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        async with await asyncio.start_server(handle, sock=listening):
            _, writer = await asyncio.open_connection(*listening.getsockname()[:2])
            value = await asyncio.wait_for(seen, 10)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay())


@pytest.mark.parametrize("flags, rows", [([], 32), (["--max_batch_rows", "128"], 64), (["--max_request_rows", "64"], 64),
                                         (["--max_batch_rows", "1"], 1)])
def test_one_request_takes_at_most_half_the_batch_unless_told(flags, rows):
    """A request as wide as the batch held every other back until it ended (47 s for 64 beams on the slice)."""
    *_, serve_args, _ = server.parse_arguments(["--model_name_or_path", os.path.join(ROOT, "configs", "glm-tiny-chinese")] + flags)
    assert serve_args.max_request_rows == rows
