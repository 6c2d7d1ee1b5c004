"""The serving engine in a thread of its own, for a front end with many connections (serve.py).

An Engine is not thread-safe: one thread steps it. Here that thread also owns it. Other
threads (one per HTTP connection) hand it submissions and cancellations through an inbox
queue; between steps it takes them in, and after each step it posts every request's
progress (the new text, the ids, the finish reason, and when asked their
log-probabilities) to that request's outbox queue, where the connection waits. The
requests of one HTTP request (n choices of each of its prompts) share one outbox.
"""
from __future__ import annotations

import queue
import threading

from .serving import Engine, RequestError


class EngineStopped(RuntimeError):
    """The engine thread is no longer running (serve.py answers 503)."""


class EngineLoop(threading.Thread):
    """Owns the Engine: takes submissions and cancellations from the connection threads,
    steps the engine while it has work, and posts each request's progress to its queue."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(name="engine", daemon=True)
        self.engine = engine
        self.inbox: queue.Queue = queue.Queue()
        self.outboxes: dict[int, queue.Queue] = {}
        self.sent: dict[int, int] = {}  # characters of each request's text already posted
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def submit(self, prompts: list[list[int]], params: dict, n: int = 1) -> tuple[list[int], queue.Queue]:
        """Hand n requests for each prompt to the engine (prompt by prompt; with a seed, the
        i-th request gets seed + i); their ids, and one queue of updates for all of them.
        RequestError if any is refused (then none of them runs)."""
        reply: queue.Queue = queue.Queue(maxsize=1)
        self.inbox.put(("submit", (prompts, params, n), reply))
        while True:
            try:
                result = reply.get(timeout=0.5)
                break
            except queue.Empty:
                if not self.is_alive():  # (stopped, or crashed: nobody will ever answer)
                    raise EngineStopped("the engine has stopped; the server cannot take requests") from None
        if isinstance(result, BaseException):
            raise result
        return result

    def cancel(self, request_ids: list[int]) -> None:
        self.inbox.put(("cancel", request_ids, None))

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self._take_commands(wait=not self.engine.has_work())
                if self.engine.has_work():
                    for request_id, ids in self.engine.step().items():
                        self._post(request_id, ids)
        except BaseException as error:  # a bug: every waiting connection gets a 500
            self.error = error
            for outbox in self.outboxes.values():
                outbox.put({"error": repr(error)})
            raise

    def _take_commands(self, wait: bool) -> None:
        try:
            command = self.inbox.get(timeout=0.05) if wait else self.inbox.get_nowait()
            while True:
                kind, payload, reply = command
                if kind == "submit":
                    reply.put(self._submit(*payload))
                elif kind == "cancel":
                    for request_id in payload:
                        self.engine.cancel(request_id)
                command = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _submit(self, prompts: list[list[int]], params: dict, n: int) -> tuple[list[int], queue.Queue] | RequestError:
        seed, ids = params["seed"], []
        try:
            for k, prompt in enumerate(prompts):
                for _ in range(n):  # (the same settings n times: the first is refused, or none is)
                    choice_seed = None if seed is None else seed + len(ids)
                    ids.append(self.engine.submit(prompt, **{**params, "seed": choice_seed}))
        except RequestError as error:
            dropped: queue.Queue = queue.Queue()  # the earlier prompts' requests: cancelled before their first step
            for request_id in ids:
                self.engine.cancel(request_id)
                self.outboxes[request_id], self.sent[request_id] = dropped, 0
            return RequestError(f"prompt {k}: {error}") if len(prompts) > 1 else error
        outbox: queue.Queue = queue.Queue()
        for request_id in ids:
            self.outboxes[request_id], self.sent[request_id] = outbox, 0
        return ids, outbox

    def _post(self, request_id: int, ids: list[int]) -> None:
        request = self.engine.request(request_id)
        text, self.sent[request_id] = request.text[self.sent[request_id]:], len(request.text)
        update = {"id": request_id, "text": text, "ids": ids, "finish_reason": request.finish_reason}
        end = self.engine.end_id  # (a chat model's <|end|>: not in the text)
        if request.logprobs is not None:  # this step's tokens' (a stream sends them as they come)
            update["logprobs"] = [e for e in request.token_logprobs[len(request.token_logprobs) - len(ids):]
                                  if e[0] != end]
        if request.prompt_logprobs is not None and len(request.output) == len(ids):  # its first update: the
            update["prompt_logprobs"] = request.prompt_token_logprobs  # prompt's scores (tokens from the second on)
        if request.done:
            update["completion_tokens"] = len(request.output)
            if request.logprobs is not None:  # the whole answer's: its text's tokens only (not a stop string's)
                update["result_logprobs"] = [e for e in request.result_logprobs() if e[0] != end]
            del self.engine.requests[request_id], self.sent[request_id]  # the server forgets it
            self.outboxes.pop(request_id).put(update)
        else:
            self.outboxes[request_id].put(update)
