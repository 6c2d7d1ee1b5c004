"""The OpenAI API's side of serving: a request's fields read and checked, and the pieces of
its answers shaped as OpenAI's clients expect them. serve.py does the HTTP around them.

A request becomes the engine's submit() settings (`sampling_params`) and prompts of token
ids (`completion_prompts`: one or several; `chat_prompt`: one, through the chat template);
anything wrong is a `BadRequest` that names the offending field, which the server sends as
OpenAI's error body. Fields this server does not implement are refused unless they ask for nothing, so an
answer never silently ignores what a client asked for.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable

from .chat import ChatTokenizer, check_messages, render
from .serving import MAX_LOGPROBS

MAX_STOPS = 4  # stop strings per request, as OpenAI allows
MAX_CHOICES = 16  # "n": completions of one prompt, each its own engine request (sharing the prompt's pages)
MAX_PROMPTS = 32  # prompts in one /v1/completions request
# OpenAI fields this server does not implement, and the values that ask for nothing (what
# clients send by default): any other value is a 400, not an answer that silently ignores it
UNSUPPORTED = {"best_of": (1,), "suffix": ("",), "logit_bias": ({},), "presence_penalty": (0,),
               "frequency_penalty": (0,), "tools": ([],), "functions": ([],)}


# --- the request's fields -------------------------------------------------------------------------


class BadRequest(Exception):
    """An error answer: the message, the offending field (or None), the status (a 4xx; a 503
    when the engine has stopped)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


def field(body: dict, name: str, kinds: tuple, default: Any = None, check=None, rule: str = "") -> Any:
    """body[name] if it is one of `kinds` (bool is never a number) and passes `check`."""
    if name not in body or body[name] is None:
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise BadRequest(f"'{name}' must be {names}, got {type(value).__name__}", name)
    if check is not None and not check(value):
        raise BadRequest(f"'{name}' must be {rule}, got {value!r}", name)
    return value


def choices_wanted(body: dict) -> int:
    """"n": how many completions of the prompt (each one a choice of the answer)."""
    return field(body, "n", (int,), 1, lambda v: 1 <= v <= MAX_CHOICES, f"in 1..{MAX_CHOICES}")


def sampling_params(body: dict, default_max_tokens: int, chat: bool = False, echo: bool = False) -> dict:
    """The engine's submit() settings from the request's OpenAI fields (with echo, logprobs
    score the prompt too)."""
    for name, nothing in ((UNSUPPORTED | {"echo": (False,)}) if chat else UNSUPPORTED).items():  # (chat has no echo)
        value = body.get(name)
        if value is not None and not any(value == v and (type(v) is not bool or value is v) for v in nothing):
            raise BadRequest(f"'{name}' is not supported by this server", name)
    limit = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:  # the chat API's newer name for max_tokens
        limit = "max_completion_tokens"
    top = f"in 0..{MAX_LOGPROBS}"
    if chat:  # "logprobs": true, and how many alternatives ("top_logprobs")
        alternatives = field(body, "top_logprobs", (int,), None, lambda v: 0 <= v <= MAX_LOGPROBS, top)
        if not field(body, "logprobs", (bool,), False):
            if alternatives is not None:
                raise BadRequest("'top_logprobs' needs \"logprobs\": true", "top_logprobs")
            logprobs = None
        else:
            logprobs = alternatives or 0
    else:  # "logprobs": how many alternatives (0: the chosen tokens' only)
        logprobs = field(body, "logprobs", (int,), None, lambda v: 0 <= v <= MAX_LOGPROBS, top)
    top_p = field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "in (0, 1]")
    stop = field(body, "stop", (str, list), ())
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")
    return dict(
        max_new_tokens=field(body, limit, (int,), default_max_tokens, lambda v: v >= 1, ">= 1"),
        temperature=float(field(body, "temperature", (int, float), 1.0, lambda v: v >= 0, ">= 0")),
        top_p=None if top_p == 1 else float(top_p),
        top_k=field(body, "top_k", (int,), None, lambda v: v >= 1, ">= 1"),
        seed=field(body, "seed", (int,), None, lambda v: v >= 0, ">= 0"),
        stop=tuple(stop), logprobs=logprobs, prompt_logprobs=logprobs if echo else None)


def echo_wanted(body: dict) -> bool:
    """Does a completion's text start with its prompt ("echo": true; with logprobs, the
    prompt's tokens are scored too, the first one null: how loglikelihood evaluation asks)?"""
    return field(body, "echo", (bool,), False)


def include_usage(body: dict, stream: bool) -> bool:
    """Does the stream end with a chunk of token counts ("stream_options": {"include_usage": true})?"""
    options = field(body, "stream_options", (dict,), None)
    if options is None:
        return False
    if not stream:
        raise BadRequest("'stream_options' is only allowed with \"stream\": true", "stream_options")
    return field(options, "include_usage", (bool,), False)


# --- the prompt -----------------------------------------------------------------------------------


def completion_prompts(body: dict, tokenizer: Any) -> list[list[int]]:
    """/v1/completions' "prompt": one prompt (a string, or a list of token ids), or a list of
    up to MAX_PROMPTS of them, answered in order (prompt i's n choices are choices i n ..
    i n + n - 1, as OpenAI numbers them)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        return [_prompt_ids(prompt, tokenizer, "")]
    if isinstance(prompt, list) and 1 <= len(prompt) <= MAX_PROMPTS and all(
            isinstance(p, str) or _is_ids(p) for p in prompt):
        return [_prompt_ids(p, tokenizer, f"prompt {i}: " if len(prompt) > 1 else "") for i, p in enumerate(prompt)]
    raise BadRequest(f"'prompt' must be a string, a list of token ids, or a list of 1..{MAX_PROMPTS} of either",
                     "prompt")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _prompt_ids(prompt: str | list[int], tokenizer: Any, which: str) -> list[int]:
    if isinstance(prompt, list):
        return prompt
    try:
        return tokenizer.encode(prompt)
    except ValueError as error:  # e.g. a character outside a char vocabulary
        raise BadRequest(which + " ".join(str(error).split()), "prompt") from None


def chat_prompt(body: dict, tokenizer: Any, model_name: str) -> list[int]:
    """/v1/chat/completions' "messages", rendered by the model's chat template, ending where
    the assistant's answer starts."""
    if not isinstance(tokenizer, ChatTokenizer):
        raise BadRequest(f"the model {model_name} has no chat template (fine-tune it with "
                         "train.py --stage sft); use /v1/completions")
    try:
        messages = check_messages(body.get("messages"), "messages")
        ids, _ = render(tokenizer, messages, add_generation_prompt=True)
    except ValueError as error:
        raise BadRequest(" ".join(str(error).split()), "messages") from None
    return ids


# --- pieces of the answer -------------------------------------------------------------------------


def logprobs_json(entries: list, decode: Callable[[list[int]], str], chat: bool, offset: int = 0) -> dict:
    """Tokens' log-probabilities (the engine's (id, log p, alternatives) entries) as OpenAI
    sends them: chat's {"content": [...]}, or the completions API's parallel lists, whose
    text_offset counts characters of the answer from `offset` (an echoed prompt's first
    token, which nothing before it scores, comes as (id, None, None): nulls)."""
    def text(token: int) -> str:
        return decode([token])
    if chat:
        def item(token: int, log_p: float) -> dict:
            piece = text(token)
            return {"token": piece, "logprob": log_p, "bytes": list(piece.encode())}
        return {"content": [{**item(token, log_p), "top_logprobs": [item(*alt) for alt in top]}
                            for token, log_p, top in entries]}
    tokens = [text(token) for token, _, _ in entries]
    return {"tokens": tokens, "token_logprobs": [log_p for _, log_p, _ in entries],
            "top_logprobs": [None if top is None else {text(alt): log_p for alt, log_p in top}
                             for _, _, top in entries],
            "text_offset": list(itertools.accumulate((len(t) for t in tokens), initial=offset))[:-1]}


def error_json(message: str, param: str | None, status: int) -> dict:
    """OpenAI's error body."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


# --- the tokenizer, as vLLM serves it (what lm-evaluation-harness's remote tokenizer calls) --------


def tokenizer_info(tokenizer: Any, block_size: int) -> dict:
    """GET /tokenizer_info. No eos_token: special tokens' names are plain text to encode()."""
    return {"tokenizer_class": type(tokenizer).__name__, "vocab_size": tokenizer.vocab_size,
            "model_max_length": block_size, "eos_token": None, "bos_token": None, "pad_token": None}


def tokenize(body: dict, tokenizer: Any, model_name: str, block_size: int) -> dict:
    """POST /tokenize: a "prompt" string (or chat "messages", rendered up to the answer) -> its ids."""
    if body.get("messages") is not None:
        ids = chat_prompt(body, tokenizer, model_name)
    else:
        prompt = field(body, "prompt", (str,), None)
        if prompt is None:
            raise BadRequest("'prompt' (a string) or 'messages' is required", "prompt")
        ids = _prompt_ids(prompt, tokenizer, "")
    return {"count": len(ids), "max_model_len": block_size, "tokens": ids}


def detokenize(body: dict, tokenizer: Any) -> dict:
    """POST /detokenize: "tokens", a list of ids -> their text, as "prompt"."""
    tokens = field(body, "tokens", (list,), None)
    if tokens is None or not all(type(t) is int for t in tokens):
        raise BadRequest("'tokens' must be a list of token ids", "tokens")
    try:
        return {"prompt": tokenizer.decode(tokens)}
    except ValueError as error:  # an id outside the vocabulary
        raise BadRequest(" ".join(str(error).split()), "tokens") from None
