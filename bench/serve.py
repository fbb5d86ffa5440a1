"""Serving figures: server.py on 127.0.0.1, loaded by concurrent streaming clients (bounded in requests and time).

    python bench/serve.py                 # tiny default shape and a glm-large-shaped slice, then mixed load and a 5-minute soak
    python bench/serve.py --soak_seconds 30 --only tiny

Per model and concurrency (1, 4, 16, 64 clients): generated tokens/s, request latency p50/p99 and time to
first token p50/p99; the speedup of 16 concurrent clients over the same requests sent one at a time; a
mixed load with 10 % bad requests (every request answered, no 5xx); the server's resident memory over a
soak. Requests are greedy with min_tgt_length = max_tokens, so every one generates the same tokens.
Models have random weights (speed does not depend on them): the tiny default's config, and 2 layers of
glm-large-chinese (hidden 1024, 16 heads, vocab 50048).
"""

import argparse
import asyncio
import concurrent.futures
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import httpx
import psutil

logging.getLogger("httpx").setLevel(logging.WARNING)  # its INFO line per request buries the figures
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from glm.cli.process import initial_environment  # noqa: E402
TOKENIZER_FILES = ("added_tokens.json", "cog-pretrain.model", "special_tokens_map.json", "tokenizer_config.json")
PROMPTS = ["类型#裙*颜色#红色*风格#复古", "类型#上衣*材质#棉*风格#休闲*图案#条纹", "这款[MASK]的连衣裙，穿着舒适。", "类型#裤*版型#宽松"]


def make_model(directory, **shape):
    import paddle

    from glm import GLMConfig, GLMForConditionalGeneration

    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(ROOT, "configs", "glm-tiny-chinese", name), directory)
    config = json.load(open(os.path.join(ROOT, "configs", "glm-tiny-chinese", "config.json")))
    config.update(shape)
    paddle.seed(0)
    GLMForConditionalGeneration(GLMConfig(**config)).save_pretrained(directory)
    return directory


class Server:
    def __init__(self, model):
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "server.py"), "--model_name_or_path", model, "--port", "0",
             "--src_length", "64", "--tgt_length", "64", "--max_queue", "256", "--max_batch_rows", "64"],
            stderr=subprocess.PIPE, text=True,
            # The environment this process started with: importing paddle here (make_model) wrote
            # OMP_NUM_THREADS=1 into os.environ, which server.py would take for the user's and compute on one core.
            env=initial_environment(),
        )  # fmt: skip
        for line in self.process.stderr:
            if line.startswith("serving "):
                self.url = line.split(" on ")[1].split()[0]
                break
        else:
            raise RuntimeError("server.py did not start")

    def cpu_seconds(self):
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def rss_mib(self):
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def stop(self):
        self.process.terminate()
        self.process.wait(60)


def request(url, prompt, tokens):
    """One streamed greedy completion from a client of its own (the soak's): (latency, time to first token, tokens)."""
    body = {"prompt": prompt, "max_tokens": tokens, "min_tgt_length": tokens, "temperature": 0, "stream": True}
    started, first = time.perf_counter(), None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and first is None:
                first = time.perf_counter() - started
    return time.perf_counter() - started, first, tokens


async def streamed(client, url, prompt, tokens):
    """request() over a shared asyncio client."""
    body = {"prompt": prompt, "max_tokens": tokens, "min_tgt_length": tokens, "temperature": 0, "stream": True}
    started, first = time.perf_counter(), None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {") and first is None:
                first = time.perf_counter() - started
    return time.perf_counter() - started, first, tokens


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def load(url, clients, requests, tokens):
    """`requests` completions from `clients` concurrent clients, each sending its next request when its last one
    ended. The clients are asyncio tasks of one thread over one connection pool: their own CPU stays small
    beside the server's on the same cores (a thread and an httpx client per request cost the client process
    more CPU than the server at 16 clients, which made the client the bottleneck being measured)."""

    async def run():
        waiting, results = list(range(requests))[::-1], []
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as client:

            async def one_client():
                while waiting:
                    index = waiting.pop()
                    results.append(await streamed(client, url, PROMPTS[index % len(PROMPTS)], tokens))

            await asyncio.gather(*[one_client() for _ in range(clients)])
        return results

    started = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - started
    latencies, ttfts = [r[0] for r in results], [r[1] for r in results]
    return wall, sum(r[2] for r in results) / wall, latencies, ttfts


def measure(name, server, tokens, requests_at):
    url = server.url
    print(f"\n{name}: greedy, {tokens} tokens per request")
    print(f"{'clients':>8} {'requests':>9} {'tokens/s':>9} {'p50 lat':>8} {'p99 lat':>8} {'p50 ttft':>9} {'p99 ttft':>9}")
    for clients in (1, 4, 16, 64):
        wall, rate, latencies, ttfts = load(url, clients, requests_at(clients), tokens)
        print(f"{clients:>8} {requests_at(clients):>9} {rate:>9.1f} {percentile(latencies, 50):>7.2f}s "
              f"{percentile(latencies, 99):>7.2f}s {percentile(ttfts, 50):>8.3f}s {percentile(ttfts, 99):>8.3f}s", flush=True)  # fmt: skip
    for _ in range(2):  # twice, interleaved: the machine's load drifts
        cpu = server.cpu_seconds()
        one_by_one = load(url, 1, 16, tokens)
        cpu_one, cpu = server.cpu_seconds() - cpu, server.cpu_seconds()
        together = load(url, 16, 16, tokens)
        cpu_together = server.cpu_seconds() - cpu
        print(f"16 requests one at a time {one_by_one[0]:.2f}s (server CPU {cpu_one:.2f}s, ttft p50 "
              f"{percentile(one_by_one[3], 50):.3f}s), 16 concurrent {together[0]:.2f}s (server CPU {cpu_together:.2f}s, "
              f"ttft p50 {percentile(together[3], 50):.3f}s): speedup {one_by_one[0] / together[0]:.1f}x", flush=True)


def mixed(url, requests=200, clients=16):
    """10 % bad requests among good ones: every request gets an answer, none a 5xx."""
    bad = [b'{"prompt": "x", ', {"prompt": "x", "max_tokens": 0}, {"prompt": 5}, {"prompt": "x", "decode_strategy": "beam"},
           {"prompt": "x", "max_tokens": "3"}]  # fmt: skip

    def one(i):
        body = bad[(i // 10) % len(bad)] if i % 10 == 0 else {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8}
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(url + "/v1/completions", content=content, headers={"Content-Type": "application/json"}, timeout=300).status_code

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        statuses = list(pool.map(one, range(requests)))
    counts = {status: statuses.count(status) for status in sorted(set(statuses))}
    print(f"\nmixed load: {requests} requests ({requests // 10} bad), {clients} clients: statuses {counts}; "
          f"5xx: {sum(v for k, v in counts.items() if k >= 500)}, answered: {len(statuses)}/{requests}", flush=True)


def soak(server, seconds, clients=16, tokens=16):
    """Steady load for `seconds`; the server's RSS every tenth of it."""
    samples, deadline, done = [server.rss_mib()], time.monotonic() + seconds, [0]

    def client(i):
        while time.monotonic() < deadline:
            request(server.url, PROMPTS[i % len(PROMPTS)], tokens)
            done[0] += 1

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, i) for i in range(clients)]
        while not all(f.done() for f in futures):
            time.sleep(seconds / 10)
            samples.append(server.rss_mib())
        for future in futures:
            future.result()
    print(f"\nsoak {seconds:.0f}s, {clients} clients, {done[0]} requests: RSS MiB "
          + " ".join(f"{s:.0f}" for s in samples), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("tiny", "large"))
    parser.add_argument("--soak_seconds", type=float, default=300)
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with open("/proc/cpuinfo") as f:
        print(next((line.split(":")[1].strip() for line in f if line.startswith("model name")), "unknown CPU"))
    with tempfile.TemporaryDirectory() as work:
        if args.only in (None, "tiny"):
            os.makedirs(os.path.join(work, "tiny"))
            server = Server(make_model(os.path.join(work, "tiny")))
            try:
                measure("tiny default shape (2 layers, hidden 128, vocab 576)", server, 32, lambda c: max(16, 2 * c))
                mixed(server.url)
                soak(server, args.soak_seconds)
            finally:
                server.stop()
        if args.only in (None, "large"):
            os.makedirs(os.path.join(work, "large"))
            model = make_model(os.path.join(work, "large"), num_layers=2, hidden_size=1024, num_attention_heads=16,
                               vocab_size=50048, max_sequence_length=1024)  # fmt: skip
            server = Server(model)
            try:
                measure("glm-large-shaped slice (2 layers, hidden 1024, vocab 50048)", server, 16, lambda c: max(8, c))
            finally:
                server.stop()
    print(f"\nload average after {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
