"""model/openai_api.py on its own: the fields' defaults and the logprobs' shapes for tokens
of several characters (the server's tests run a character model, one character a token)."""
import inspect

import pytest

from model.openai_api import BadRequest, completion_prompts, echo_wanted, logprobs_json, sampling_params
from model.serving import Engine

PIECES = {0: "Hello", 1: " wor", 2: "ld", 3: "é"}


def decode(ids):
    return "".join(PIECES[i] for i in ids)


def test_a_request_without_fields_asks_for_the_engines_own_defaults():
    params = sampling_params({}, default_max_tokens=16)
    defaults = {name: p.default for name, p in inspect.signature(Engine.submit).parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert params.pop("max_new_tokens") == 16
    assert params == {name: defaults[name] for name in params}
    assert set(params) == {"temperature", "top_k", "top_p", "seed", "stop", "logprobs", "prompt_logprobs"}


def test_chat_takes_max_completion_tokens_before_max_tokens_and_logprobs_as_a_switch():
    params = sampling_params({"max_tokens": 5, "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 3},
                             16, chat=True)
    assert params["max_new_tokens"] == 7 and params["logprobs"] == 3
    assert sampling_params({"max_completion_tokens": 7}, 16)["max_new_tokens"] == 16  # (a chat field only)
    with pytest.raises(BadRequest) as error:
        sampling_params({"top_logprobs": 2}, 16, chat=True)
    assert error.value.param == "top_logprobs"


def test_completion_logprobs_offsets_count_characters_of_whole_tokens():
    entries = [(0, -0.5, [(0, -0.5), (1, -1.5)]), (1, -0.25, [(1, -0.25)]), (2, -0.125, [])]
    shaped = logprobs_json(entries, decode, chat=False, offset=3)
    assert shaped["tokens"] == ["Hello", " wor", "ld"]
    assert shaped["text_offset"] == [3, 8, 12]  # each token starts where the text before it ends
    assert shaped["token_logprobs"] == [-0.5, -0.25, -0.125]
    assert shaped["top_logprobs"] == [{"Hello": -0.5, " wor": -1.5}, {" wor": -0.25}, {}]


def test_chat_logprobs_give_each_tokens_utf8_bytes():
    shaped = logprobs_json([(3, -0.75, [(0, -2.0)])], decode, chat=True)
    assert shaped == {"content": [{"token": "é", "logprob": -0.75, "bytes": [195, 169],
                                   "top_logprobs": [{"token": "Hello", "logprob": -2.0, "bytes": list(b"Hello")}]}]}


class Letters:
    def encode(self, text):
        if not text.islower():
            raise ValueError(f"cannot encode {text!r}")
        return [ord(c) - ord("a") for c in text]


@pytest.mark.parametrize("prompt,ids", [
    ("ab", [[0, 1]]), ([3, 4], [[3, 4]]), (["ab"], [[0, 1]]), (["ab", [3, 4], "c"], [[0, 1], [3, 4], [2]]),
])
def test_one_prompt_or_a_list_of_them(prompt, ids):
    assert completion_prompts({"prompt": prompt}, Letters()) == ids


@pytest.mark.parametrize("prompt,message", [
    (None, "'prompt' must be"), ([], "'prompt' must be"), ([[]], "'prompt' must be"),
    ([[1, True]], "'prompt' must be"),  # (a bool is no token id)
    (["ab", "AB"], "prompt 1: cannot encode"), ("AB", "cannot encode"), (["x"] * 33, "'prompt' must be"),
])
def test_a_prompt_that_is_no_prompt_is_refused_naming_it(prompt, message):
    with pytest.raises(BadRequest) as error:
        completion_prompts({"prompt": prompt}, Letters())
    assert error.value.param == "prompt" and str(error.value).startswith(message)


def test_echo_with_logprobs_scores_the_prompt_and_its_first_token_is_null():
    body = {"echo": True, "logprobs": 2}
    assert echo_wanted(body) and sampling_params(body, 16, echo=True)["prompt_logprobs"] == 2
    assert sampling_params({"echo": True}, 16, echo=True)["prompt_logprobs"] is None  # (echo alone: text only)
    assert sampling_params({"logprobs": 1}, 16)["prompt_logprobs"] is None  # (no echo: the prompt is not scored)
    shaped = logprobs_json([(0, None, None), (1, -0.5, [(1, -0.5)])], decode, chat=False)
    assert shaped["token_logprobs"] == [None, -0.5] and shaped["top_logprobs"] == [None, {" wor": -0.5}]
    assert shaped["text_offset"] == [0, 5]
    with pytest.raises(BadRequest) as error:  # (chat has no echo)
        sampling_params(body, 16, chat=True)
    assert error.value.param == "echo"
