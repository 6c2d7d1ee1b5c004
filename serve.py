"""Serve a checkpoint over HTTP in the OpenAI API's format: completions, chat, streaming.

    python serve.py --out-dir out-shakespeare-char-cpu --port 8000
    python serve.py --init-from gpt2 --port 8000          # GPT-2's weights
    curl -s localhost:8000/v1/completions -d '{"prompt": "ROMEO:", "max_tokens": 40}'

Endpoints: POST /v1/completions, POST /v1/chat/completions (a checkpoint fine-tuned with
a chat template: train.py --stage sft), GET /v1/models (and /v1/models/ID), GET /health
(200 while the engine thread runs, else 503), and vLLM's POST /tokenize, POST /detokenize
and GET /tokenizer_info. "stream": true sends server-sent
events ("stream_options": {"include_usage": true} adds the token counts at the end); chat
takes max_completion_tokens or max_tokens; "n" completions of a prompt share its pages, and
"prompt" may list several prompts (their choices in order, n each); "logprobs" returns
each token's log-probability (and the likeliest alternatives), "echo" puts the prompt
first (with logprobs, scored too: what loglikelihood evaluation asks for).
Any OpenAI client works: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").

One engine thread (model/engine_thread.py) runs model/serving.py's Engine: requests from
all connections join its running batch between steps (continuous batching). Each
connection has its own thread (the standard library's ThreadingHTTPServer), which reads
its request's OpenAI fields (model/openai_api.py), hands the request to the engine thread
and waits for the tokens. A bad request gets a 4xx with an OpenAI-style error body; a
client that disconnects cancels its request; Ctrl-C or SIGTERM stops cleanly.
Binds 127.0.0.1 unless --host says otherwise.
"""
import os
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "10")  # before NumPy loads: see tinygrad_lite/cpu.py, knob 1

import json
import queue
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from model.cli import HelpFormatter, OneLineParser, UserError, report
from model.engine_thread import EngineLoop, EngineStopped
from model.openai_api import (BadRequest, chat_prompt, choices_wanted, completion_prompts, detokenize, echo_wanted,
                              error_json, field, include_usage, logprobs_json, sampling_params, tokenize,
                              tokenizer_info)
from model.serving import Engine, RequestError
from tinygrad_lite import backend, cpu, ops_tier
from tinygrad_lite.functional import DEFAULT_TIER, TIERS

MAX_BODY_BYTES = 1 << 20  # a request body over 1 MiB is refused (413)


def parse_args(argv=None):
    p = OneLineParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out-dir", default="out-shakespeare-char-cpu", help="an out dir of train.py")
    p.add_argument("--init-from", default=None, help="instead of --out-dir: an out dir, a GPT-2 folder or a hub name")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together")
    p.add_argument("--page-size", type=int, default=16, help="tokens per page of the KV cache")
    p.add_argument("--num-blocks", type=int, default=None,
                   help="pages in the KV cache (default: enough for max-batch-size full contexts)")
    p.add_argument("--max-step-tokens", type=int, default=512,
                   help="tokens one engine step computes at most: a long prompt is prefilled in chunks this "
                        "size, so the streams already running keep their pace (Engine's default, 2048, "
                        "favours throughput)")
    p.add_argument("--model-name", default=None, help="the model id clients see (default: the out dir's name)")
    p.add_argument("--device", default=None, help="cpu, cuda or strict (default: TINYGRAD_LITE_DEVICE or cpu)")
    p.add_argument("--ops", choices=list(TIERS), default=DEFAULT_TIER, help="which tier of the ops runs")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Everything that can be checked before the checkpoint is read."""
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535 (0: a free one), got {args.port}")
    for flag in ("max_batch_size", "page_size", "num_blocks", "max_step_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")


class App:
    """What the handlers share: the engine thread, the tokenizer, the model's name."""

    def __init__(self, loop: EngineLoop, tokenizer: Any, model_name: str, block_size: int) -> None:
        self.loop, self.tokenizer, self.model_name, self.block_size = loop, tokenizer, model_name, block_size
        self.created = int(time.time())
        self._ids = iter(range(1, 1 << 62))
        self._lock = threading.Lock()

    def next_id(self, prefix: str) -> str:
        with self._lock:
            return f"{prefix}-{next(self._ids)}"


# --- the HTTP side -------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive for plain responses; streams close the connection
    server_version = "tinygrad_lite"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: one line per request on stderr
        if self.server.verbose:
            super().log_message(format, *args)

    @property
    def app(self) -> App:
        return self.server.app

    # --- routes

    def do_GET(self) -> None:
        route = self.path.rstrip("/")
        model = {"id": self.app.model_name, "object": "model", "created": self.app.created, "owned_by": "tinygrad_lite"}
        if route == "/v1/models":
            return self.send_json(200, {"object": "list", "data": [model]})
        if route == f"/v1/models/{self.app.model_name}":
            return self.send_json(200, model)
        if route == "/tokenizer_info":  # (as vLLM's)
            return self.send_json(200, tokenizer_info(self.app.tokenizer, self.app.block_size))
        if route == "/health":  # (as vLLM's: 200 while the engine thread runs)
            if self.app.loop.is_alive():
                return self.send_json(200, {"status": "ok"})
            return self.send_error_json(BadRequest("the engine thread has stopped", status=503))
        self.send_error_json(BadRequest(f"no route GET {self.path}", status=404))

    def do_POST(self) -> None:
        route = self.path.rstrip("/")
        try:
            if route not in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
                raise BadRequest(f"no route POST {self.path}", status=404)
            body = self.read_json()
            if route == "/tokenize":  # (vLLM's tokenizer, for clients that count or score tokens themselves)
                return self.send_json(200, tokenize(body, self.app.tokenizer, self.app.model_name, self.app.block_size))
            if route == "/detokenize":
                return self.send_json(200, detokenize(body, self.app.tokenizer))
            chat = route.endswith("chat/completions")
            if chat:
                prompts = [chat_prompt(body, self.app.tokenizer, self.app.model_name)]
            else:
                prompts = completion_prompts(body, self.app.tokenizer)
            default_max = max(1, self.app.block_size - len(prompts[0])) if chat else 16  # as OpenAI's defaults
            stream = field(body, "stream", (bool,), False)
            echo = not chat and echo_wanted(body)
            params = sampling_params(body, default_max, chat, echo)
            usage = include_usage(body, stream)
            n = choices_wanted(body)
            try:
                request_ids, updates = self.app.loop.submit(prompts, params, n)
            except RequestError as error:
                raise BadRequest(" ".join(str(error).split()), "prompt") from None
            except EngineStopped as error:
                raise BadRequest(str(error), status=503) from None
        except BadRequest as error:
            return self.send_error_json(error)
        prompt_tokens = sum(len(prompt) for prompt in prompts)  # (each counted once, whatever n)
        echoed = [prompt for prompt in prompts for _ in range(n)] if echo else None  # (prompt by prompt, n each)
        if stream:
            answer = StreamAnswer(self, request_ids, updates, chat, prompt_tokens, echoed, usage)
        else:
            answer = WholeAnswer(self, request_ids, updates, chat, prompt_tokens, echoed)
        answer.run()

    # --- reading and writing

    def read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise BadRequest("the request needs a Content-Length header", status=411)
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the unread body would be taken for the next request
            raise BadRequest(f"the request body is over {MAX_BODY_BYTES} bytes", status=413)
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise BadRequest(f"the body is not valid JSON: {error}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(self, error: BadRequest) -> None:
        self.send_json(error.status, error_json(str(error), error.param, error.status))

    def client_gone(self) -> bool:
        """True once the client has closed its end (readable, with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


class WholeAnswer:
    """Wait for the whole answer (its n choices: one engine request each), then send it as
    one JSON body."""

    def __init__(self, handler: Handler, request_ids: list[int], updates: queue.Queue, chat: bool,
                 prompt_tokens: int, echoed: list[list[int]] | None = None) -> None:
        self.handler, self.request_ids, self.updates, self.chat = handler, request_ids, updates, chat
        self.prompt_tokens, self.echoed = prompt_tokens, echoed  # echoed: each choice's prompt, to put first
        self.prompt_scores: dict[int, list] = {}  # choice -> its prompt's (id, log p, alternatives), with echo
        self.index = {request_id: i for i, request_id in enumerate(request_ids)}  # request -> its choice
        self.last: dict[int, dict] = {}  # each finished request's last update
        self.app = handler.app

    def usage(self) -> dict:
        """The token counts of the finished choices (each prompt counted once, as OpenAI does)."""
        completion = sum(update["completion_tokens"] for update in self.last.values())
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def echo_entries(self, i: int) -> list:
        """Choice i's prompt as logprobs entries: its first token scored by nothing (nulls)."""
        return [(self.echoed[i][0], None, None), *self.prompt_scores.get(i, [])]

    def updates_until_done(self):
        """The engine's updates for these requests until all have finished: (choice index, update),
        or an update with "error" (then stop). Ends early if the client left (all cancelled)."""
        while len(self.last) < len(self.request_ids):
            try:
                update = self.updates.get(timeout=0.1)
            except queue.Empty:
                if self.handler.client_gone():
                    self.app.loop.cancel(self.request_ids)
                    return
                continue
            if "error" in update:
                yield None, update
                return
            if update["finish_reason"] is not None:
                self.last[update["id"]] = update
            if "prompt_logprobs" in update:  # (in a request's first update)
                self.prompt_scores[self.index[update["id"]]] = update["prompt_logprobs"]
            yield self.index[update["id"]], update

    def run(self) -> None:
        texts = [[] for _ in self.request_ids]
        for i, update in self.updates_until_done():
            if "error" in update:
                return self.handler.send_error_json(BadRequest("the engine failed: " + update["error"], status=500))
            texts[i].append(update["text"])
        if len(self.last) < len(self.request_ids):
            return  # the client left
        choices = []
        for i, request_id in enumerate(self.request_ids):
            last = self.last[request_id]
            choice = {"index": i, "finish_reason": last["finish_reason"], "logprobs": None}
            text, entries = "".join(texts[i]), last.get("result_logprobs")
            if self.echoed is not None:  # the prompt first
                text = self.app.tokenizer.decode(self.echoed[i]) + text
                if entries is not None:
                    entries = self.echo_entries(i) + entries
            if entries is not None:
                choice["logprobs"] = logprobs_json(entries, self.app.tokenizer.decode, self.chat)
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choices.append(choice)
        self.handler.send_json(200, {
            "id": self.app.next_id("chatcmpl" if self.chat else "cmpl"),
            "object": "chat.completion" if self.chat else "text_completion",
            "created": int(time.time()), "model": self.app.model_name, "choices": choices, "usage": self.usage()})


class StreamAnswer(WholeAnswer):
    """Send each piece of text as it comes, as server-sent events (a choice's index in each),
    then `data: [DONE]`. With include_usage, every chunk has "usage": null and one more
    chunk, with no choices, brings the token counts before [DONE] (as OpenAI's stream_options).
    Asked for, each token's log-probability comes in the chunk of the step that made it
    (a stop string's own tokens too: the text that holds them back cannot call them back).
    With echo, a choice's first chunk is its prompt (and its prompt's scores)."""

    def __init__(self, handler: Handler, request_ids: list[int], updates: queue.Queue, chat: bool,
                 prompt_tokens: int, echoed: list[list[int]] | None = None, include_usage: bool = False) -> None:
        super().__init__(handler, request_ids, updates, chat, prompt_tokens, echoed)
        self.include_usage = include_usage
        self.offsets = [0] * len(request_ids)  # each choice's characters of token text so far (text_offset)

    def run(self) -> None:
        h = self.handler
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Connection", "close")  # the end of the stream is the end of the connection
        h.end_headers()
        h.close_connection = True
        self.id, self.created = self.app.next_id("chatcmpl" if self.chat else "cmpl"), int(time.time())
        try:
            if self.chat:
                for i in range(len(self.request_ids)):
                    self.send(i, {"role": "assistant", "content": ""}, None)
            echoing = set(range(len(self.request_ids))) if self.echoed is not None else set()
            for i, update in self.updates_until_done():
                if "error" in update:
                    return self.send_event({"error": {"message": update["error"], "type": "server_error"}})
                if i in echoing:  # a choice's first chunk: its prompt (scored once the prompt is computed)
                    echoing.remove(i)
                    self.send(i, self.app.tokenizer.decode(self.echoed[i]), None,
                              self.echo_entries(i) if "logprobs" in update else None)
                entries = update.get("logprobs")
                if update["text"] or update["finish_reason"] is None:
                    self.send(i, {"content": update["text"]} if self.chat else update["text"], None, entries)
                    entries = None
                if update["finish_reason"] is not None:
                    self.send(i, {} if self.chat else "", update["finish_reason"], entries)
            if len(self.last) < len(self.request_ids):
                return  # the client left
            if self.include_usage:
                self.send_chunk([], self.usage())
            h.wfile.write(b"data: [DONE]\n\n")
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client left mid-stream
            self.app.loop.cancel(self.request_ids)

    def send(self, index: int, piece: Any, finish_reason: str | None, entries: list | None = None) -> None:
        choice = {"index": index, "finish_reason": finish_reason, "logprobs": None}
        choice["delta" if self.chat else "text"] = piece
        if entries:
            choice["logprobs"] = logprobs_json(entries, self.app.tokenizer.decode, self.chat, self.offsets[index])
            self.offsets[index] += 0 if self.chat else sum(len(t) for t in choice["logprobs"]["tokens"])
        self.send_chunk([choice])

    def send_chunk(self, choices: list, usage: dict | None = None) -> None:
        chunk = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                 "created": self.created, "model": self.app.model_name, "choices": choices}
        if self.include_usage:
            chunk["usage"] = usage
        self.send_event(chunk)

    def send_event(self, payload: dict) -> None:
        self.handler.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.handler.wfile.flush()


class Server(ThreadingHTTPServer):
    """The standard library's threaded server, a thread per connection, quiet about clients
    that hang up: a dropped connection is routine for a server (its request is cancelled, or
    already done), not a bug worth a traceback. Any other error in a handler still prints one."""

    daemon_threads = True  # a connection left open does not hold up the shutdown
    # NOTE: connections the kernel holds until the server accepts them (socketserver's default
    # is 5). A burst beyond it waits out a connect timeout, or is reset: 64 clients hammering a
    # tiny model for 20 s (2-core AMD EPYC VM) saw 1-10 resets a run with 5, none in 5 runs with 128
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # (broken pipe, reset, aborted)
            super().handle_error(request, client_address)


# --- putting it together -------------------------------------------------------------------------


def make_server(model: Any, tokenizer: Any, host: str = "127.0.0.1", port: int = 0, model_name: str = "model",
                max_batch_size: int = 16, page_size: int = 16, num_blocks: int | None = None,
                max_step_tokens: int = 512, verbose: bool = False) -> Server:
    """A server (not yet serving) and its started engine thread (server.app.loop)."""
    context_pages = -(-model.config.block_size // page_size)
    if num_blocks is None:  # every sequence of a full batch can reach the whole context
        num_blocks = max_batch_size * context_pages
    if num_blocks < context_pages:  # (as vLLM refuses a KV cache shorter than the model's context)
        raise ValueError(f"a KV cache of {num_blocks} x {page_size}-token pages cannot hold one full context of "
                         f"{model.config.block_size} tokens: num_blocks must be >= {context_pages}")
    engine = Engine(model, max_batch_size, page_size, num_blocks, tokenizer=tokenizer,
                    max_step_tokens=max(max_step_tokens, max_batch_size))
    loop = EngineLoop(engine)
    server = Server((host, port), Handler)
    server.app, server.verbose = App(loop, tokenizer, model_name, model.config.block_size), verbose
    loop.start()
    return server


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        cpu.tune()
        if args.device:
            backend.set_default_device(args.device)
        from sample import load_model  # one loader for both scripts: one-line errors for a bad checkpoint
        with ops_tier(args.ops):
            model, tokenizer = load_model(args.out_dir, args.init_from)
            name = args.model_name or os.path.basename(os.path.normpath(args.init_from or args.out_dir))
            try:
                server = make_server(model, tokenizer, args.host, args.port, name, args.max_batch_size,
                                     args.page_size, args.num_blocks, args.max_step_tokens)
            except ValueError as error:
                raise UserError(str(error)) from None
            host, port = server.server_address[:2]
            print(f"serving {name} on http://{host}:{port}/v1 (Ctrl-C to stop)", file=sys.stderr, flush=True)
            stop = threading.Event()

            def on_signal(signum, frame):
                stop.set()
                threading.Thread(target=server.shutdown, daemon=True).start()
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
            server.serve_forever(poll_interval=0.1)
            server.server_close()
            server.app.loop.stopping.set()
            server.app.loop.join(timeout=5)
            print("stopped", file=sys.stderr, flush=True)
        return 0
    except OSError as error:
        if isinstance(error, PermissionError) or getattr(error, "errno", None) in (98, 99, 13):  # address in use
            return report(UserError(f"cannot listen on {args.host}:{args.port}: {error.strerror}"), args.debug)
        return report(error, args.debug)
    except Exception as error:
        return report(error, args.debug)


if __name__ == "__main__":
    sys.exit(main())
