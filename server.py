"""Serve a GLM checkpoint over HTTP: OpenAI's /v1/completions, GLM's /fill and /score, a page at /.

    python server.py --model_name_or_path CKPT [--lora_path A | --prefix_path P] [--prefixes NAME=DIR ...]
                     [--host 127.0.0.1] [--port 8000]

Loading, adapter verification and the decoding defaults are predict_generation.py's (its flags; those not
given from the checkpoint's generation_settings.json, then the built-ins); a request's own settings go
on top. Requests are batched as they arrive (glm/serving/engine.py). SIGTERM or Ctrl-C: new connections
are refused, requests in flight finish within --drain_seconds, exit 0.
"""

import asyncio
import ipaddress
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import List, Optional

import uvicorn

from glm.bounds import COUNT, NON_NEGATIVE, POSITIVE, Bound, check_flag
from glm.cli.arguments import parse_flags
from glm.cli.console import ConsoleArguments, say
from glm.cli.process import command
from glm.errors import UserError
from glm.generation_settings import GENERATION_SETTINGS, GenerationArguments
from glm.prediction import EMBEDDED_DEFAULT_MODEL, CheckpointArguments, load_predictor, resolve_settings
from glm.prefix import load_prefix
from glm.ptuning import checked_prompt_config, has_prompt
from glm.serving.app import ServeOptions, create_app
from glm.serving.state import ServedPrompt
from glm.serving.middleware import HeaderTimeout

API_KEY_VARIABLE = "GLM_API_KEY"
PORT = Bound(0, 65535)
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), EMBEDDED_DEFAULT_MODEL)


@dataclass
class ServeArguments:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on (0.0.0.0: every interface)."})
    port: int = field(default=8000, metadata={"help": "Port to listen on (0: any free port, printed)."})
    api_key: Optional[str] = field(
        default=None, metadata={"help": f"Require 'Authorization: Bearer KEY' on all but /health (or ${API_KEY_VARIABLE})."}
    )
    served_model_name: Optional[str] = field(default=None, metadata={"help": "The model's name in the API (default: the directory's name)."})
    drain_seconds: float = field(default=30.0, metadata={"help": "On SIGTERM/SIGINT, time for requests in flight to finish."})
    request_timeout: float = field(default=300.0, metadata={"help": "Seconds a request may take, queued or decoding (then 504)."})
    max_queue: int = field(default=64, metadata={"help": "Requests waiting to join the batch; more are refused with 503 + Retry-After."})
    max_batch_rows: int = field(default=64, metadata={"help": "Rows decoded together (beams or answer copies, summed)."})
    max_request_rows: Optional[int] = field(
        default=None, metadata={"help": "Rows one request may take (prompts x beams or answers); a wider one is refused "
                                        "with 400 (default: half of --max_batch_rows, so one request never fills the "
                                        "batch and holds every other one back until it ends)."})
    allowed_hosts: List[str] = field(
        default_factory=list, metadata={"help": "Host names a request may name besides localhost, 127.0.0.1 and [::1] "
                                                "while the server listens on a loopback address (DNS rebinding)."})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "Largest request body accepted (then 413)."})
    header_timeout: float = field(default=10.0, metadata={"help": "Seconds a connection may take to send a request's head."})
    prompt_path: Optional[str] = field(
        default=None, metadata={"help": "/score only: a THUDM P-tuning prompt (finetune_cloze.py --ptuning --freeze_backbone's "
                                        "output) for this base; a --ptuning checkpoint that trained its whole model "
                                        "carries its own, applied by itself."})
    prefixes: List[str] = field(
        default_factory=list, metadata={"help": "More models over the same base, NAME=DIR each: a P-tuning v2 prefix "
                                                "(--prefix_tuning's output) served as model NAME (a request's `model`)."})


def parse_arguments(argv):
    model_args, generation_args, serve_args, console_args = parse_flags(
        (CheckpointArguments, GenerationArguments, ServeArguments, ConsoleArguments), argv,
        description=f"Decoding flags are the server's defaults; a request's own settings override them. Flags not "
        f"given come from the checkpoint's {GENERATION_SETTINGS}, then from the defaults below.",
    )
    resolve_settings(argv, model_args, generation_args, DEFAULT_MODEL)
    serve_args.api_key = serve_args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    for name, bound in (("max_queue", COUNT), ("max_batch_rows", COUNT), ("max_body_bytes", COUNT), ("port", PORT),
                        ("drain_seconds", NON_NEGATIVE), ("request_timeout", POSITIVE), ("header_timeout", POSITIVE)):
        check_flag(name, getattr(serve_args, name), bound)
    if serve_args.max_request_rows is None:
        serve_args.max_request_rows = max(1, serve_args.max_batch_rows // 2)
    check_flag("max_request_rows", serve_args.max_request_rows, COUNT, high=serve_args.max_batch_rows,
               high_is="--max_batch_rows: a request never runs alone past the batch")
    return model_args, generation_args, serve_args, console_args


def load_named_prefixes(specs: List[str], predictor, base_path: str, model_name: str, model_args) -> dict:
    """{name: GLMPrefixModel} of --prefixes NAME=DIR ..., each verified against the base (as --prefix_path is)."""
    if specs and (model_args.lora_path or model_args.prefix_path):
        flag = "--lora_path" if model_args.lora_path else "--prefix_path"
        raise UserError(f"--prefixes with {flag}: a prefix is trained on the base alone; serve the base and each "
                        "prefix by name (--prefixes NAME=DIR ...)")
    prefixes = {}
    for spec in specs:
        name, _, directory = spec.partition("=")
        if not name or not directory:
            raise UserError(f"--prefixes {spec}: give NAME=DIR")
        if name == model_name or name in prefixes:
            raise UserError(f"--prefixes {spec}: the name {name!r} is served already")
        prefixes[name] = load_prefix(predictor.generator.runner.model, directory, base_path, model_args.force)
    return prefixes


def served_prompt(prompt_path: Optional[str], base_path: str, predictor, model_args) -> Optional[ServedPrompt]:
    """The P-tuning prompt /score applies: --prompt_path (checked against the base), or the checkpoint's own."""
    if prompt_path and (model_args.lora_path or model_args.prefix_path):
        raise UserError("--prompt_path with --lora_path or --prefix_path: a prompt is trained on the base alone")
    if prompt_path:
        return ServedPrompt(prompt_path, checked_prompt_config(prompt_path, predictor.generator.model.config, base_path,
                                                               model_args.force), base_path, model_args.force)
    if has_prompt(base_path):  # a --ptuning run that trained its whole model: its prompt is part of it
        return ServedPrompt(base_path, checked_prompt_config(base_path, predictor.generator.model.config), None)
    return None


def is_loopback(host: str) -> bool:
    """Whether `host` (the --host flag) is this machine's loopback address, reachable only from here."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound here, so a taken port is one line, not uvicorn's traceback; uvicorn serves on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections whose
    # socket says TCP, and without it a response's body waited ~40 ms behind its headers on a kept-alive
    # connection (the client's delayed ACK): every answer to the OpenAI client or httpx was 40 ms late.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.listen(2048)  # from here a client's connection waits in the backlog while the app starts
    return sock


class _Server(uvicorn.Server):
    def handle_exit(self, sig, frame):
        state = self.config.app.state.serving
        state.stop_accepting()  # /ready says 503 at once; keep-alive requests get 503
        super().handle_exit(sig, frame)
        # What still decodes when the drain time is nearly out is ended by the engine ("shutdown": a 503, or an
        # error event and [DONE] in a stream) before uvicorn cancels the request tasks, which would answer a
        # plain-text 500 and cut streams mid-chunk.
        drain = self.config.timeout_graceful_shutdown
        if drain is not None and not self.force_exit:
            asyncio.get_running_loop().call_later(max(0.0, drain - 0.5), lambda: state.engine.stop(wait=False))


def main(argv=None):
    # glibc's own mmap threshold, not return_freed_memory's 1 MiB: every decoding step allocates [rows, vocab]
    # logits and their log-softmax (3.2 MB for 16 rows of glm-large's vocabulary), and with a page mapped
    # afresh for each of them the page faults took ~35 % of a 16-row step on the glm-large slice (engine
    # alone: 1.4 s -> 0.9 s for 16 requests). glibc raises its threshold above such blocks once freed, so
    # they are reused from the heap; a server's memory is its steady state, not a plan's peak (the soak's
    # RSS stays flat: README, Serving).
    with command(freed_memory_returned=False):
        model_args, generation_args, serve_args, console_args = parse_arguments(sys.argv[1:] if argv is None else argv)
        predictor = load_predictor(model_args, generation_args, DEFAULT_MODEL, batch_size=1)
        path = model_args.model_path(DEFAULT_MODEL)
        model_name = serve_args.served_model_name or os.path.basename(os.path.normpath(path))
        prefixes = load_named_prefixes(serve_args.prefixes, predictor, path, model_name, model_args)
        prompt = served_prompt(serve_args.prompt_path, path, predictor, model_args)
        options = ServeOptions(
            model_name=model_name,
            api_key=serve_args.api_key, max_body_bytes=serve_args.max_body_bytes, max_queue=serve_args.max_queue,
            max_rows=serve_args.max_batch_rows, max_request_rows=serve_args.max_request_rows,
            request_timeout=serve_args.request_timeout,
            allowed_hosts=serve_args.allowed_hosts if is_loopback(serve_args.host) else None,
        )  # fmt: skip
        sock = listening_socket(serve_args.host, serve_args.port)
    app = create_app(predictor, generation_args, options, prefixes, prompt)
    HeaderTimeout.seconds = serve_args.header_timeout
    config = uvicorn.Config(app, log_level=console_args.log_level, access_log=console_args.log_level in ("debug", "info"),
                            timeout_graceful_shutdown=serve_args.drain_seconds, http=HeaderTimeout)  # fmt: skip
    host, port = sock.getsockname()[:2]
    say(f"serving {', '.join([options.model_name, *prefixes])} on http://{host if ':' not in host else f'[{host}]'}:{port}"
        + (" (API key required)" if options.api_key else ""))
    # uvicorn re-raises the signal it stopped on once it has drained; with these handlers that is a no-op,
    # so a drained shutdown exits 0.
    for handled in (signal.SIGTERM, signal.SIGINT):
        signal.signal(handled, lambda *_: None)
    _Server(config).run(sockets=[sock])
    say("stopped")


if __name__ == "__main__":
    main()
