"""serve.py: the OpenAI-compatible HTTP server. Concurrent and streamed completions from
the official `openai` client and from plain urllib, chat completions, every bad request a
4xx while the server stays up, a client that leaves mid-stream cancels its request, and
SIGTERM stops the process cleanly. Servers bind 127.0.0.1 on a free port.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import serve
import tinygrad_lite
from model.chat import ChatTokenizer, render
from model.generate import generate
from model.gpt import GPT, GPTConfig
from model.tokenizer import CharTokenizer
from reference_logprobs import log_softmax_of
from tinygrad_lite import backend

ROOT = Path(__file__).resolve().parent.parent
TEXT = "abcdefghijklmnopqrstuvwxyz .,!?:\n"
BLOCK = 64


def tiny_model(tokenizer) -> GPT:
    tinygrad_lite.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=BLOCK, n_layer=2, n_head=2, n_embd=16))


class Running:
    """A server on a free port, serving from a thread, and the URL to reach it."""

    def __init__(self, tokenizer, name: str, **settings) -> None:
        self.tokenizer, self.model = tokenizer, tiny_model(tokenizer)
        settings = {"max_batch_size": 4, "page_size": 4, **settings}
        self.server = serve.make_server(self.model, tokenizer, port=0, model_name=name, **settings)
        self.url = "http://%s:%d" % self.server.server_address[:2]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def engine(self):
        return self.server.app.loop.engine

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.server.app.loop.stopping.set()
        self.server.app.loop.join(timeout=5)


@pytest.fixture(scope="module")
def text_server():
    server = Running(CharTokenizer(TEXT), "tiny-char")
    yield server
    server.close()


@pytest.fixture(scope="module")
def chat_server():
    server = Running(ChatTokenizer(CharTokenizer(TEXT)), "tiny-chat")
    yield server
    server.close()


def post(url: str, body, path: str = "/v1/completions", raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def stream_chunks(server: Running, path: str, body: dict) -> list[dict]:
    """A streamed answer's chunks, read by plain urllib (it must end with [DONE])."""
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def greedy_text(server: Running, prompt: str, n: int) -> str:
    ids = server.tokenizer.encode(prompt)
    return server.tokenizer.decode(generate(server.model, [ids], n, temperature=0)[0])


def needs_cpu():
    if backend.default_device() != "cpu":
        pytest.skip("the server tests run on the CPU device")


# --- the official client ---------------------------------------------------------------------


def test_the_openai_client_gets_concurrent_and_streamed_completions(text_server):
    needs_cpu()
    from openai import OpenAI
    client = OpenAI(base_url=text_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    prompts = ["to be or", "the king", "a horse, a", "what light"]

    def complete(prompt):
        return client.completions.create(model="tiny-char", prompt=prompt, max_tokens=12, temperature=0)
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(complete, prompts))
    for prompt, answer in zip(prompts, answers):
        assert answer.choices[0].text == greedy_text(text_server, prompt, 12)
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.prompt_tokens == len(prompt) and answer.usage.completion_tokens == 12
        assert answer.object == "text_completion" and answer.model == "tiny-char"
    pieces = [chunk.choices[0].text for chunk in
              client.completions.create(model="tiny-char", prompt="to be or", max_tokens=12, temperature=0, stream=True)]
    assert len(pieces) >= 12 and "".join(pieces) == greedy_text(text_server, "to be or", 12)
    *chunks, last = client.completions.create(model="tiny-char", prompt="to be or", max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    assert all(chunk.usage is None for chunk in chunks)
    assert "".join(chunk.choices[0].text for chunk in chunks) == "".join(pieces)
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (8, 12)
    assert [m.id for m in client.models.list().data] == ["tiny-char"]
    assert client.models.retrieve("tiny-char").id == "tiny-char"


def test_the_openai_client_chats_with_a_chat_checkpoint(chat_server):
    needs_cpu()
    from openai import OpenAI
    client = OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "shout: hi"}]
    answer = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8, temperature=0)
    from model.chat import render
    ids, _ = render(chat_server.tokenizer, messages, add_generation_prompt=True)
    expected = generate(chat_server.model, [ids], 8, temperature=0)[0]
    end = chat_server.tokenizer.end_of_turn
    expected_text = chat_server.tokenizer.decode(expected[:expected.index(end)] if end in expected else expected)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected_text
    streamed = client.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=8, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected_text
    # max_completion_tokens: the chat API's newer name for max_tokens
    short = client.chat.completions.create(model="tiny-chat", messages=messages, max_completion_tokens=3, temperature=0)
    assert short.usage.completion_tokens == min(3, len(expected)) and expected_text.startswith(
        short.choices[0].message.content)


# --- plain urllib ------------------------------------------------------------------------------


def test_urllib_gets_concurrent_completions_and_a_stream(text_server):
    needs_cpu()
    prompts = ["to be or", "the king", "what light"]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda p: post(text_server.url, {"prompt": p, "max_tokens": 10, "temperature": 0}),
                                prompts))
    for prompt, (status, body) in zip(prompts, answers):
        assert status == 200 and body["choices"][0]["text"] == greedy_text(text_server, prompt, 10)
    request = urllib.request.Request(text_server.url + "/v1/completions", data=json.dumps(
        {"prompt": "the king", "max_tokens": 10, "temperature": 0, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"  # (a proxy must pass each event on at once)
        events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy_text(text_server, "the king", 10)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_n_choices_are_n_requests_that_share_the_prompts_pages(text_server):
    needs_cpu()
    from openai import OpenAI
    client = OpenAI(base_url=text_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    prompt, engine = "ecce homo, ecce lux!", text_server.engine  # 20 tokens: 4 full pages of 4 before the last
    hits = engine.prefix_hits
    answer = client.completions.create(model="tiny-char", prompt=prompt, max_tokens=6, temperature=1.0, seed=5, n=3)
    assert engine.prefix_hits - hits == 2 * 4  # the 2nd and 3rd choice held the 1st one's prompt pages
    assert [c.index for c in answer.choices] == [0, 1, 2] and answer.usage.completion_tokens == 18
    assert answer.usage.prompt_tokens == 20  # (the prompt counted once)
    for choice in answer.choices:  # choice i draws as a request with seed 5 + i would
        alone = client.completions.create(model="tiny-char", prompt=prompt, max_tokens=6, temperature=1.0,
                                          seed=5 + choice.index)
        assert choice.text == alone.choices[0].text
    texts = ["", "", ""]
    for chunk in client.completions.create(model="tiny-char", prompt=prompt, max_tokens=6, temperature=1.0, seed=5,
                                           n=3, stream=True):
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [c.text for c in answer.choices]


def test_several_prompts_are_answered_in_order_n_choices_each(text_server):
    """OpenAI's completions take a list of prompts: prompt i's n choices are choices i n ..
    i n + n - 1, and the usage counts each prompt once."""
    needs_cpu()
    from openai import OpenAI
    client = OpenAI(base_url=text_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    prompts = ["to be", "or not, "]
    answer = client.completions.create(model="tiny-char", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert [c.text for c in answer.choices] == [greedy_text(text_server, p, 5) for p in prompts for _ in range(2)]
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5 + 8, 4 * 5)
    texts = ["", ""]
    for chunk in client.completions.create(model="tiny-char", prompt=prompts, max_tokens=5, temperature=0,
                                           stream=True):
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [answer.choices[0].text, answer.choices[2].text]
    ids = [text_server.tokenizer.encode(p) for p in prompts]  # lists of token ids, by plain urllib
    status, body = post(text_server.url, {"prompt": ids, "max_tokens": 5, "temperature": 0})
    assert status == 200 and [c["text"] for c in body["choices"]] == texts


@pytest.mark.parametrize("second,message", [
    ("a" * 70, "prompt 1: the prompt (70 tokens)"),  # longer than the context: refused by the engine
    ("TO BE", "prompt 1: "),  # characters the vocabulary lacks: refused while encoding
])
def test_a_bad_prompt_among_several_refuses_them_all(text_server, second, message):
    needs_cpu()
    engine = text_server.engine
    computed = engine.computed_tokens
    status, error = post(text_server.url, {"prompt": ["to be", second], "max_tokens": 3, "n": 2})
    assert status == 400 and error["error"]["param"] == "prompt" and error["error"]["message"].startswith(message)
    deadline = time.monotonic() + 10  # the first prompt's requests, queued before the second was refused, ...
    while (engine.has_work() or engine.requests) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.computed_tokens == computed  # ... never ran ...
    assert engine.requests == {} and engine.free_blocks == engine.num_blocks  # ... nor stayed
    status, error = post(text_server.url, {"prompt": [second], "max_tokens": 3})  # one prompt: no number
    assert status == 400 and not error["error"]["message"].startswith("prompt 0")


def test_logprobs_are_the_models_own_for_each_token_whole_and_streamed(text_server):
    needs_cpu()
    from openai import OpenAI

    from model.generate import generate_with_logits
    client = OpenAI(base_url=text_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    answer = client.completions.create(model="tiny-char", prompt="to be or", max_tokens=6, temperature=0, logprobs=2)
    text, got = answer.choices[0].text, answer.choices[0].logprobs
    assert "".join(got.tokens) == text and got.text_offset == list(range(6))  # (one character a token)
    logits = generate_with_logits(text_server.model, [text_server.tokenizer.encode("to be or")], 6)[1][0]
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))  # (6, V): log-softmax of what each token was chosen from
    want = [log_p[i, t] for i, t in enumerate(text_server.tokenizer.encode(text))]
    np.testing.assert_allclose(got.token_logprobs, want, rtol=1e-5, atol=1e-6)
    for token, log_prob, top in zip(got.tokens, got.token_logprobs, got.top_logprobs):
        assert len(top) == 2 and next(iter(top)) == token and top[token] == log_prob  # greedy: the most likely
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="tiny-char", prompt="to be or", max_tokens=6, temperature=0, logprobs=2, stream=True)
        if c.choices[0].logprobs is not None]
    assert [t for s in streamed for t in s.tokens] == got.tokens
    assert [lp for s in streamed for lp in s.token_logprobs] == got.token_logprobs
    assert [o for s in streamed for o in s.text_offset] == got.text_offset


def test_echo_scores_the_prompt_as_loglikelihood_evaluation_asks(text_server, chat_server):
    """lm-eval's completions model sends a batch of prompts with echo, logprobs and
    max_tokens 1, and sums token_logprobs over a continuation: each must be the model's own
    log-softmax at that position (the first token's null), whatever the prefix cache holds."""
    needs_cpu()
    prompts = ["to be or", "to be or not"]  # (the second starts with the first: no cached page may be reused)
    status, body = post(text_server.url, {"prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": 1,
                                          "temperature": 0})
    assert status == 200
    for prompt, choice in zip(prompts, body["choices"]):
        text, got = choice["text"], choice["logprobs"]
        assert text[:-1] == prompt and text == prompt + greedy_text(text_server, prompt, 1)
        assert got["tokens"] == list(text) and got["text_offset"] == list(range(len(text)))
        assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
        ids = text_server.tokenizer.encode(text)
        log_p = log_softmax_of(text_server.model, ids)
        expected = [log_p[position, token] for position, token in enumerate(ids[1:])]
        np.testing.assert_allclose(got["token_logprobs"][1:], expected, atol=1e-5)
        assert [list(top) for top in got["top_logprobs"][1:]] == [  # the likeliest next character at each
            [text_server.tokenizer.decode([int(np.argmax(row))])] for row in log_p[:-1]]
    # lm-evaluation-harness's local-completions, as it asks (token ids) and reads (from the context's end on)
    context, continuation = text_server.tokenizer.encode("to be"), text_server.tokenizer.encode(" or not")
    status, body = post(text_server.url, {"model": "tiny-char", "prompt": [context + continuation], "temperature": 0,
                                          "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True})
    got = body["choices"][0]["logprobs"]
    loglikelihood = sum(got["token_logprobs"][len(context):-1])
    is_greedy = all(lp == max(top.values()) for lp, top in zip(got["token_logprobs"][len(context):-1],
                                                                got["top_logprobs"][len(context):-1]))
    log_p = log_softmax_of(text_server.model, context + continuation)
    expected = [log_p[len(context) + i - 1, token] for i, token in enumerate(continuation)]
    assert loglikelihood == pytest.approx(sum(expected), abs=1e-4)
    assert is_greedy == all(np.argmax(log_p[len(context) + i - 1]) == token for i, token in enumerate(continuation))
    status, body = post(text_server.url, {"prompt": "to be", "echo": True, "max_tokens": 2, "temperature": 0})
    assert body["choices"][0]["text"] == "to be" + greedy_text(text_server, "to be", 2)  # echo alone: the text
    assert body["choices"][0]["logprobs"] is None
    whole = {"prompt": prompts, "echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0}
    status, body = post(text_server.url, whole)
    streamed = [{"text": "", "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []} for _ in prompts]
    for chunk in stream_chunks(text_server, "/v1/completions", {**whole, "stream": True}):
        choice = chunk["choices"][0]  # (a stream's first chunk of a choice: the prompt, with its scores)
        streamed[choice["index"]]["text"] += choice["text"]
        for key, values in (choice["logprobs"] or {}).items():
            streamed[choice["index"]][key] += values
    assert streamed == [{"text": c["text"], **c["logprobs"]} for c in body["choices"]]
    status, error = post(chat_server.url, {"messages": [{"role": "user", "content": "hi"}], "echo": True},
                         path="/v1/chat/completions")
    assert status == 400 and error["error"]["param"] == "echo"  # (chat has no echo)


def test_chat_logprobs_cover_the_reply_not_the_end_of_turn(chat_server):
    needs_cpu()
    from openai import OpenAI
    client = OpenAI(base_url=chat_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    answer = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert "".join(item.token for item in content) == answer.choices[0].message.content
    assert all(len(item.top_logprobs) == 3 and item.bytes == list(item.token.encode()) for item in content)
    status, error = post(chat_server.url, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
                         path="/v1/chat/completions")
    assert status == 400 and error["error"]["param"] == "top_logprobs"

    class EndsAtAssistant(ChatTokenizer):  # this random model's first greedy token ends the turn
        end_of_turn = property(lambda self: self.special("<|assistant|>"))
    ending = Running(EndsAtAssistant(CharTokenizer(TEXT)), "tiny-chat")
    try:
        status, answer = post(ending.url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
                                           "temperature": 0, "logprobs": True}, path="/v1/chat/completions")
        chunks = stream_chunks(ending, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0, "logprobs": True,
            "stream": True})
    finally:
        ending.close()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] == 1
    assert choice["message"]["content"] == "" and choice["logprobs"]["content"] == []  # <|end|> is not the reply's
    assert [c["choices"][0]["logprobs"] for c in chunks] == [None, None]  # (the role's chunk; the finish's)


def test_a_completion_stops_at_a_stop_string(text_server):
    needs_cpu()
    full = greedy_text(text_server, "to be or", 20)
    stop = full[6:8]
    status, body = post(text_server.url, {"prompt": "to be or", "max_tokens": 20, "temperature": 0, "stop": stop,
                                          "logprobs": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == full[:full.index(stop)]
    assert "".join(body["choices"][0]["logprobs"]["tokens"]) == body["choices"][0]["text"]  # (not the stop's tokens)


# --- bad requests: a 4xx each, and the server goes on ------------------------------------------


@pytest.mark.parametrize("body,raw,status,param", [
    (None, b"{not json", 400, None),
    (None, b"[1, 2]", 400, None),
    ({"prompt": "to be", "max_tokens": "ten"}, None, 400, "max_tokens"),
    ({"prompt": 7}, None, 400, "prompt"),
    ({"prompt": ["to be", 7]}, None, 400, "prompt"),
    ({"prompt": ["to be"] * 33}, None, 400, "prompt"),  # more prompts than one request may bring
    ({"prompt": "to be", "max_tokens": 0}, None, 400, "max_tokens"),
    ({"prompt": "to be", "max_tokens": 200}, None, 400, "prompt"),  # prompt + max_tokens > the context
    ({"prompt": "to be", "temperature": -0.5}, None, 400, "temperature"),
    ({"prompt": "to be", "top_p": 0}, None, 400, "top_p"),
    ({"prompt": "to be", "top_p": 1.5}, None, 400, "top_p"),
    ({"prompt": "to be", "seed": -1}, None, 400, "seed"),
    ({"prompt": "to be", "top_k": 0}, None, 400, "top_k"),
    ({"prompt": "a" * 100, "max_tokens": 1}, None, 400, "prompt"),  # longer than the model takes
    ({"prompt": "TO BE"}, None, 400, "prompt"),  # characters the vocabulary lacks
    ({"prompt": "to be", "stream": "yes"}, None, 400, "stream"),
    ({"prompt": "to be", "stream_options": {"include_usage": True}}, None, 400, "stream_options"),  # not a stream
    ({"prompt": "to be", "stream": True, "stream_options": "usage"}, None, 400, "stream_options"),
    ({"prompt": "to be", "n": 0}, None, 400, "n"),
    ({"prompt": "to be", "n": 17}, None, 400, "n"),
    ({"prompt": "to be", "stop": ["a", "b", "c", "d", "e"]}, None, 400, "stop"),
    ({"prompt": "to be", "logprobs": 21}, None, 400, "logprobs"),
    ({"prompt": "to be", "logprobs": True}, None, 400, "logprobs"),  # (the completions API's is a number)
    ({"prompt": "to be", "presence_penalty": 0.5}, None, 400, "presence_penalty"),  # not implemented: not ignored
])
def test_each_bad_request_gets_its_4xx_and_the_server_stays_up(text_server, body, raw, status, param):
    needs_cpu()
    got, error = post(text_server.url, body, raw=raw)
    assert got == status and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == param and error["error"]["message"]
    ok, answer = post(text_server.url, {"prompt": "to be", "max_tokens": 3, "temperature": 0})
    assert ok == 200 and len(answer["choices"][0]["text"]) == 3


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 70) | st.floats(-2, 3, allow_nan=False) | st.text("ab c", max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("abrolecnt", max_size=7), inner, max_size=3),
    max_leaves=6)
FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "n", "stream", "stream_options", "logprobs", "top_logprobs", "echo", "presence_penalty", "model", "user",
          "suffix", "tokens"]
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bob", 3]),
                                           "content": st.text("ab c", max_size=8) | st.integers()}), max_size=3)


@settings(max_examples=max(settings().max_examples, 60))
@given(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6), st.none() | MESSAGES,
       st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]))
def test_any_json_body_is_answered_or_refused_never_a_server_error(chat_server, body, messages, path):
    # the OpenAI fields, each given any JSON value (and chat messages of any shape): the
    # answer is a whole completion, a whole stream, or a 4xx with an error body, never a 500
    needs_cpu()
    body = body if messages is None else {**body, "messages": messages}
    connection = http.client.HTTPConnection(*chat_server.server.server_address[:2], timeout=30)
    connection.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    raw = response.read()
    connection.close()
    if response.status != 200:
        assert 400 <= response.status < 500 and "message" in json.loads(raw)["error"], (response.status, raw)
    elif path in ("/tokenize", "/detokenize"):
        assert "tokens" in json.loads(raw) or isinstance(json.loads(raw)["prompt"], str)
    elif body.get("stream") is True:
        assert raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
    else:
        assert json.loads(raw)["choices"]


def test_fields_left_at_values_that_ask_for_nothing_are_accepted(text_server):
    needs_cpu()
    status, answer = post(text_server.url, {"prompt": "to be", "max_tokens": 3, "logprobs": None, "echo": False,
                                            "best_of": 1, "presence_penalty": 0.0, "frequency_penalty": 0})
    assert status == 200 and len(answer["choices"][0]["text"]) == 3


@pytest.mark.parametrize("fields", [
    {"top_p": 1}, {"top_p": 0.9}, {"seed": 0}, {"top_k": 1}, {"logprobs": 20}, {"stop": ["w", "x", "y", "z"]},
    {"stop": "a stop string longer than four characters"},
])
def test_values_at_the_edges_of_what_a_field_allows_are_accepted(text_server, fields):
    needs_cpu()
    status, answer = post(text_server.url, {"prompt": "to be", "max_tokens": 3, **fields})
    assert status == 200 and answer["choices"][0]["finish_reason"] in ("length", "stop")


def test_omitted_max_tokens_are_openais_defaults(text_server, chat_server):
    """16 for a completion; for a chat, the rest of the context."""
    needs_cpu()
    status, answer = post(text_server.url, {"prompt": "to be", "temperature": 0})
    assert status == 200 and answer["usage"]["completion_tokens"] == 16
    assert answer["choices"][0]["finish_reason"] == "length"
    status, answer = post(chat_server.url, {"messages": [{"role": "user", "content": "hi"}], "temperature": 0},
                          path="/v1/chat/completions")
    assert status == 200 and answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"] <= BLOCK


def test_a_body_over_the_limit_is_413_and_unknown_routes_404(text_server, monkeypatch):
    needs_cpu()
    monkeypatch.setattr(serve, "MAX_BODY_BYTES", 100)
    status, error = post(text_server.url, {"prompt": "to be " * 40})
    assert status == 413 and "over 100 bytes" in error["error"]["message"]
    assert post(text_server.url, {"prompt": "x"}, path="/v1/nothing")[0] == 404
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(text_server.url + "/v2/models", timeout=10)
    assert missing.value.code == 404
    assert post(text_server.url, {"prompt": "to be", "max_tokens": 2})[0] == 200


def test_health_is_200_while_the_engine_runs_and_503_after_as_are_requests(text_server):
    needs_cpu()
    server = Running(CharTokenizer(TEXT), "short-lived")
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
    server.server.app.loop.stopping.set()  # the engine thread ends (as after a crash): load balancers must know
    server.server.app.loop.join(timeout=5)
    with pytest.raises(urllib.error.HTTPError) as down:
        urllib.request.urlopen(server.url + "/health", timeout=10)
    assert down.value.code == 503
    status, error = post(server.url, {"prompt": "to be", "max_tokens": 2})  # answered, not left waiting
    assert status == 503 and "engine has stopped" in error["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as unknown:  # another model's id
        urllib.request.urlopen(text_server.url + "/v1/models/gpt-4", timeout=10)
    assert unknown.value.code == 404
    server.close()


def test_vllms_tokenizer_endpoints_serve_clients_that_count_or_score_tokens_themselves(text_server, chat_server):
    """/tokenizer_info, /tokenize and /detokenize, as lm-evaluation-harness's remote tokenizer
    probes and calls them: a model with no Hugging Face tokenizer (a character one) can be
    evaluated through the server alone."""
    needs_cpu()
    with urllib.request.urlopen(text_server.url + "/tokenizer_info", timeout=10) as response:
        info = json.loads(response.read())
    assert "eos_token" in info and (info["vocab_size"], info["model_max_length"]) == (len(TEXT), BLOCK)
    status, body = post(text_server.url, {"prompt": "test", "add_special_tokens": False}, path="/tokenize")
    assert status == 200 and body == {"count": 4, "max_model_len": BLOCK, "tokens": text_server.tokenizer.encode("test")}
    status, body = post(text_server.url, {"tokens": body["tokens"]}, path="/detokenize")
    assert status == 200 and body == {"prompt": "test"}
    messages = [{"role": "user", "content": "hi"}]
    status, body = post(chat_server.url, {"messages": messages}, path="/tokenize")
    assert status == 200 and body["tokens"] == render(chat_server.tokenizer, messages, add_generation_prompt=True)[0]
    for url, path, request, param in [
        (text_server.url, "/tokenize", {"messages": messages}, None),  # no chat template
        (text_server.url, "/tokenize", {"prompt": "TO BE"}, "prompt"),  # characters the vocabulary lacks
        (text_server.url, "/tokenize", {"prompt": 5}, "prompt"),
        (text_server.url, "/tokenize", {}, "prompt"),
        (text_server.url, "/detokenize", {"tokens": [len(TEXT)]}, "tokens"),  # outside the vocabulary
        (text_server.url, "/detokenize", {"tokens": "ab"}, "tokens"),
        (text_server.url, "/detokenize", {"tokens": [1, True]}, "tokens"),
    ]:
        status, error = post(url, request, path=path)
        assert status == 400 and error["error"]["param"] == param, (path, request)


def test_chat_on_a_model_without_a_chat_template_is_a_400(text_server):
    needs_cpu()
    status, error = post(text_server.url, {"messages": [{"role": "user", "content": "hi"}]}, path="/v1/chat/completions")
    assert status == 400 and "no chat template" in error["error"]["message"]


def test_bad_chat_messages_are_a_400(chat_server):
    needs_cpu()
    status, error = post(chat_server.url, {"messages": [{"role": "wizard", "content": "hi"}]},
                         path="/v1/chat/completions")
    assert status == 400 and error["error"]["param"] == "messages"
    status, error = post(chat_server.url, {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
                         path="/v1/chat/completions")
    assert status == 400 and error["error"]["param"] == "max_completion_tokens"


# --- a client that leaves ------------------------------------------------------------------------


def test_a_client_that_disconnects_mid_stream_cancels_its_request(text_server):
    needs_cpu()
    engine = text_server.engine
    host, port = text_server.server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    body = json.dumps({"prompt": "to be", "max_tokens": 55, "stream": True, "temperature": 1.0})
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.readline().startswith(b"data: ")  # the stream has begun ...
    connection.close()  # ... and the client leaves
    deadline = time.monotonic() + 20
    # (the engine thread frees the pages in its step and forgets the request just after:
    # wait for both, or this check can land in between)
    while time.monotonic() < deadline and (engine.has_work() or engine.free_blocks != engine.num_blocks
                                           or engine.requests):
        time.sleep(0.05)
    assert not engine.has_work() and engine.free_blocks == engine.num_blocks
    assert engine.requests == {}  # finished (cancelled) and forgotten


def slowed(server: Running, seconds: float):
    """Make each engine step take `seconds` (a big model's pace): connections then wait on
    an empty queue between updates."""
    engine, step = server.engine, server.engine.step

    def slow_step():
        time.sleep(seconds)
        return step()
    engine.step = slow_step
    return server


def test_a_client_that_leaves_before_its_whole_answer_cancels_it_and_a_slow_engine_still_answers():
    needs_cpu()
    server = slowed(Running(CharTokenizer(TEXT), "slow"), 0.15)
    try:
        status, answer = post(server.url, {"prompt": "to be", "max_tokens": 3, "temperature": 0})
        assert status == 200 and answer["choices"][0]["text"] == greedy_text(server, "to be", 3)
        host, port = server.server.server_address[:2]
        computed = server.engine.computed_tokens
        connection = http.client.HTTPConnection(host, port, timeout=30)
        connection.request("POST", "/v1/completions", body=json.dumps({"prompt": "to be", "max_tokens": 50}),
                           headers={"Content-Type": "application/json"})
        time.sleep(0.3)  # (its first steps run)
        connection.close()  # the client leaves before the whole answer
        engine, deadline = server.engine, time.monotonic() + 10
        while (engine.has_work() or engine.requests) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.requests == {} and engine.computed_tokens - computed < 20  # cancelled, well before 5 + 49
    finally:
        server.close()


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_that_fails_gives_a_500_or_an_error_event_not_a_hang(stream, monkeypatch):
    needs_cpu()
    monkeypatch.setattr(threading, "excepthook", lambda args: None)  # (the engine thread's own report)
    server = Running(CharTokenizer(TEXT), "failing")

    def broken_step():
        raise RuntimeError("a bug")
    server.engine.step = broken_step
    try:
        if stream:
            chunks = [json.loads(line[6:]) for line in urllib.request.urlopen(urllib.request.Request(
                server.url + "/v1/completions", data=json.dumps({"prompt": "to be", "stream": True}).encode()),
                timeout=30).read().decode().splitlines() if line.startswith("data: ")]
            assert chunks == [{"error": {"message": "RuntimeError('a bug')", "type": "server_error"}}]
        else:
            status, error = post(server.url, {"prompt": "to be"})
            assert status == 500 and error["error"]["message"] == "the engine failed: RuntimeError('a bug')"
            assert error["error"]["type"] == "server_error"
    finally:
        server.close()


def test_a_streams_logprobs_come_even_in_steps_whose_text_is_held_back(text_server):
    """Text that could start a stop string waits; its tokens' log-probabilities do not."""
    needs_cpu()
    full = greedy_text(text_server, "to be or", 20)
    stop = full[5] + "#"  # (its first character appears, the whole string never: text is held back, then released)
    chunks = stream_chunks(text_server, "/v1/completions", {
        "prompt": "to be or", "max_tokens": 20, "temperature": 0, "stop": stop, "logprobs": 0, "stream": True,
        "stream_options": {"include_usage": True}})
    entries = [token for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
               for token in c["choices"][0]["logprobs"]["tokens"]]
    assert "".join(entries) == "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == full
    assert any(c["choices"] and c["choices"][0]["text"] == "" and c["choices"][0]["finish_reason"] is None
               for c in chunks)  # (a step that held its text back)


def test_a_client_that_hangs_up_leaves_no_traceback(text_server, capsys):
    """Clients drop connections all the time: the server says nothing (socketserver's default
    prints a traceback for each) and goes on serving."""
    needs_cpu()
    host, port = text_server.server.server_address[:2]
    before = set(threading.enumerate())  # other tests' threads may end meanwhile: watch only ours
    with socket.create_connection((host, port), timeout=30) as client:
        body = json.dumps({"prompt": "to be", "max_tokens": 3}).encode()
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        reply = client.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200") and b"Connection: close" not in reply  # kept alive ...
        handlers = set(threading.enumerate()) - before
        assert handlers and all(thread.is_alive() for thread in handlers)  # ... by the thread that served it
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # ... and reset (linger 0), while the server's thread waits for the next request on it
    deadline = time.monotonic() + 10
    while any(thread.is_alive() for thread in handlers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(thread.is_alive() for thread in handlers)  # that thread has met the reset and ended
    status, body = post(text_server.url, {"prompt": "to be", "max_tokens": 3})
    assert status == 200 and len(body["choices"][0]["text"]) == 3
    assert "Traceback" not in capsys.readouterr().err


def test_a_burst_of_connections_waits_for_the_server_instead_of_being_turned_away():
    """64 clients connect before the server accepts any (the kernel's listen queue holds
    them; socketserver's default of 5 would time the 7th out), then each gets its answer."""
    needs_cpu()
    tokenizer = CharTokenizer(TEXT)
    server = serve.make_server(tiny_model(tokenizer), tokenizer, port=0)
    host, port = server.server_address[:2]
    clients = [socket.create_connection((host, port), timeout=5) for _ in range(64)]  # nobody accepts yet
    threading.Thread(target=server.serve_forever, daemon=True).start()
    body = json.dumps({"prompt": "to be", "max_tokens": 2}).encode()
    try:
        for client in clients:
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        for client in clients:
            with client, client.makefile("rb") as reply:
                assert reply.readline().startswith(b"HTTP/1.1 200")
    finally:
        server.shutdown()
        server.server_close()
        server.app.loop.stopping.set()
        server.app.loop.join(timeout=5)


def test_a_crowd_of_clients_is_served_and_nothing_is_left_behind(capsys):
    """Eight clients at once, 12 seeded requests each: whole answers (of one or two choices)
    and streamed ones, stop strings, bad requests and clients that leave mid-stream, on a pool small enough to
    preempt and a step budget small enough to prefill in chunks. Every answer is well
    formed, each greedy one is generate()'s, and afterwards every page is back, the server
    remembers no request, and nothing was printed."""
    needs_cpu()
    server = Running(CharTokenizer(TEXT), "crowd", max_batch_size=6, num_blocks=20, max_step_tokens=24)
    greedy, problems = [], []

    def client(seed: int) -> None:
        try:
            requests(random.Random(seed))
        except Exception as error:  # (a thread's exception would not fail the test by itself)
            problems.append(error)

    def requests(rng: random.Random) -> None:
        for _ in range(12):
            prompt = "".join(rng.choice("abc de") for _ in range(rng.randint(1, 40)))
            body = {"prompt": prompt, "max_tokens": rng.choice([1, 5, 20]), "temperature": rng.choice([0, 0, 0.8])}
            if rng.random() < 0.2:
                body["stop"] = rng.choice(["a", ["b ", "c"]])
            kind = rng.choice(["whole", "stream", "bad", "leaves"])
            if kind == "bad":
                status, error = post(server.url, {**body, "top_p": 2})
                if status != 400 or error["error"]["param"] != "top_p":
                    problems.append((status, error))
            elif kind == "whole":
                status, answer = post(server.url, {**body, "n": rng.choice([1, 2])})
                if status != 200 or any(c["finish_reason"] not in ("stop", "length") for c in answer["choices"]):
                    problems.append((status, answer))
                elif body["temperature"] == 0 and "stop" not in body:
                    greedy.extend((prompt, body["max_tokens"], choice["text"]) for choice in answer["choices"])
            else:
                connection = http.client.HTTPConnection(*server.server.server_address[:2], timeout=30)
                connection.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}))
                response = connection.getresponse()
                events = [response.readline()] if kind == "leaves" else response.read().split(b"\n\n")[:-1]
                connection.close()
                if not events[0].startswith(b"data: ") or kind == "stream" and events[-1] != b"data: [DONE]":
                    problems.append(events)
                elif kind == "stream" and body["temperature"] == 0 and "stop" not in body:
                    pieces = [json.loads(event[6:])["choices"][0]["text"] for event in events[:-1]]
                    greedy.append((prompt, body["max_tokens"], "".join(pieces)))
    try:
        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        engine, deadline = server.engine, time.monotonic() + 20
        while time.monotonic() < deadline and (engine.has_work() or engine.requests
                                               or engine.free_blocks != engine.num_blocks):
            time.sleep(0.05)
    finally:
        server.close()
    assert problems == [] and server.server.app.loop.error is None
    assert engine.preemptions > 0  # (the crowd did need the small pool's rules)
    assert not engine.has_work() and engine.requests == {} and engine.free_blocks == engine.num_blocks
    assert server.server.app.loop.outboxes == {} and not any(engine.pool.ref_counts)
    assert len(greedy) > 5 and all(text == greedy_text(server, prompt, n) for prompt, n, text in greedy)
    assert "Traceback" not in capsys.readouterr().err


# --- the script ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "data.txt").write_text("to be or not to be, that is the question.\n" * 60)
    result = subprocess.run([sys.executable, "train.py", "--data", str(tmp / "data.txt"), "--out-dir", str(tmp / "out"),
                             "--max-iters", "2", "--eval-iters", "1", "--eval-interval", "2", "--batch-size", "2",
                             "--block-size", "32", "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
                             "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TINYGRAD_LITE_DEVICE": "cpu"})
    assert result.returncode == 0, result.stderr
    return tmp / "out"


def test_serve_py_answers_and_stops_cleanly_on_sigterm(checkpoint):
    needs_cpu()
    process = subprocess.Popen([sys.executable, "serve.py", "--out-dir", str(checkpoint), "--port", "0"],
                               cwd=ROOT, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TINYGRAD_LITE_DEVICE": "cpu"})
    try:
        line = process.stderr.readline()
        assert line.startswith("serving out on http://127.0.0.1:"), line
        url = line.split()[3].removesuffix("/v1")
        status, body = post(url, {"prompt": "to be", "max_tokens": 5})
        assert status == 200 and len(body["choices"][0]["text"]) == 5
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert "stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("flags,message", [
    ([], "no checkpoint"),
    (["--port", "99999"], "--port"),  # (checked before the checkpoint is read)
    (["--page-size", "0"], "--page-size"),
    (["--max-step-tokens", "0"], "--max-step-tokens"),
])
def test_serve_py_with_a_bad_flag_or_checkpoint_is_one_line(tmp_path, flags, message):
    needs_cpu()
    result = subprocess.run([sys.executable, "serve.py", "--out-dir", str(tmp_path / "nothing"), "--port", "0", *flags],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("error:")
    assert message in result.stderr


def test_a_kv_cache_too_small_for_one_full_context_is_refused_at_start():
    model = tiny_model(CharTokenizer(TEXT))  # a context of 64 tokens: 16 pages of 4
    with pytest.raises(ValueError, match="num_blocks must be >= 16"):
        serve.make_server(model, CharTokenizer(TEXT), page_size=4, num_blocks=15)
