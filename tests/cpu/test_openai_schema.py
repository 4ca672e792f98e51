"""Every answer of the Serve app (transformers engine, one deployment for the module, test_serve's
fixtures) validated against the OpenAI API's published schemas, as the ``openai`` package's
pydantic types carry them: ChatCompletion, ChatCompletionChunk, Completion, Model, ModelList and
the error object; and the request shapes real clients send (text parts, ``developer``, ``n``,
prompt lists and token ids, neutral values of unimplemented fields).

python -m pytest tests/cpu/test_openai_schema.py -q
"""

import json

import pytest
import requests

from test_serve import AUTH, cfg_overrides, monkeypatch_module, store, url  # noqa: F401


def _post(url, path, body):
    return requests.post(f"{url}{path}", json=body, headers=AUTH, timeout=120)


def _events(url, path, body):
    with requests.post(f"{url}{path}", json=body, headers=AUTH, timeout=120, stream=True) as s:
        assert s.status_code == 200, s.text
        events = [line[6:] for line in s.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def _strict(cls, body):
    return cls.model_validate(body, strict=True)


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
VALID = [  # accepted although this server implements none of their non-neutral values
    (CHAT, {"messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Tea"}, {"type": "text", "text": "or coffee?"}]}]}),
    (CHAT, {"messages": HI, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0, "seed": None,
            "logit_bias": {}, "tools": None, "user": "u1", "temperature": None, "top_p": None, "n": None}),
    (CHAT, {"messages": HI, "logprobs": None, "stream_options": None}),
    (COMPLETIONS, {"prompt": "Hola", "echo": False, "best_of": 1, "logprobs": None, "suffix": None}),
]


@pytest.mark.parametrize("path,body", VALID, ids=range(len(VALID)))
def test_valid_requests_real_clients_send_are_answered_in_the_published_schema(url, path, body):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    r = _post(url, path, {"model": "GB", "max_tokens": 4, **body})
    assert r.status_code == 200, r.text
    out = _strict(ChatCompletion if path == CHAT else Completion, r.json())
    assert out.choices and out.usage.completion_tokens >= 0
    if path == CHAT:
        raw = r.json()["choices"][0]
        assert raw["logprobs"] is None and raw["message"]["refusal"] is None  # required, nullable


def test_n_choices_and_prompt_lists_give_one_choice_each(url):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    c = _strict(ChatCompletion, _post(url, CHAT, {"model": "GB", "messages": HI, "n": 3, "max_tokens": 4}).json())
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    r = _post(url, COMPLETIONS, {"model": "MX", "prompt": ["Hola", "Adiós"], "n": 2, "max_tokens": 3})
    c = _strict(Completion, r.json())
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3] and c.choices[0].text == c.choices[1].text
    ids = _post(url, COMPLETIONS, {"model": "MX", "prompt": [[31, 32, 33], [40, 41]], "max_tokens": 3})
    assert len(_strict(Completion, ids.json()).choices) == 2
    bad = _post(url, COMPLETIONS, {"prompt": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_streams_validate_chunk_by_chunk_and_a_cut_stream_says_length(url):
    from openai.types import Completion
    from openai.types.chat import ChatCompletionChunk

    chunks = _events(url, CHAT, {"model": "GB", "messages": HI, "stream": True, "max_tokens": 3,
                                 "stream_options": {"include_usage": True}})
    for c in chunks:
        _strict(ChatCompletionChunk, c)
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and chunks[-1]["choices"] == []
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    chunks = _events(url, COMPLETIONS, {"model": "MX", "prompt": "Hola", "stream": True, "max_tokens": 3,
                                        "stream_options": {"include_usage": True}})
    for c in chunks:  # the package types a streamed text chunk as Completion, whose finish_reason is
        # not nullable; OpenAI itself streams null before the last chunk: validate with it filled
        _strict(Completion, {**c, "choices": [{**ch, "finish_reason": ch["finish_reason"] or "length"}
                                               for ch in c["choices"]]})
        assert all(ch["finish_reason"] in (None, "stop", "length") for ch in c["choices"])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["completion_tokens"] == 3
    assert _events(url, CHAT, {"model": "GB", "messages": HI, "stream": True, "max_tokens": 2,
                               "stream_options": {"include_usage": None}})[-1]["choices"][0]["finish_reason"]


def test_a_stream_of_several_choices_carries_each_choice_index_to_its_own_finish(url):
    from openai.types.chat import ChatCompletionChunk

    chunks = _events(url, CHAT, {"model": "GB", "messages": HI, "stream": True, "n": 2, "max_tokens": 3,
                                 "stream_options": {"include_usage": True}})
    for c in chunks:
        _strict(ChatCompletionChunk, c)
    texts, finished = {0: "", 1: ""}, {0: [], 1: []}
    for c in chunks[:-1]:
        (ch,) = c["choices"]
        texts[ch["index"]] += ch["delta"].get("content") or ""
        if ch["finish_reason"]:
            finished[ch["index"]].append(ch["finish_reason"])
    assert finished == {0: ["length"], 1: ["length"]}, finished
    plain = _post(url, CHAT, {"model": "GB", "messages": HI, "n": 2, "max_tokens": 3}).json()
    assert [texts[0], texts[1]] == [ch["message"]["content"] for ch in plain["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_models_and_errors_validate(url):
    from openai.types import ErrorObject, Model
    from openai.pagination import SyncPage

    models = requests.get(f"{url}/v1/models", headers=AUTH, timeout=30).json()
    SyncPage[Model].model_validate(models)
    for m in models["data"]:
        _strict(Model, m)
    _strict(Model, requests.get(f"{url}/v1/models/auto", headers=AUTH, timeout=30).json())
    errors = [_post(url, CHAT, {"messages": HI, "logprobs": True}),
              _post(url, CHAT, {"messages": HI, "stream_options": {"include_usage": True}}),
              _post(url, CHAT, {"messages": HI, "best_of": 2}),
              _post(url, CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
              _post(url, CHAT, {"model": "ZZ", "messages": HI}),
              requests.get(f"{url}/v1/models/ZZ", headers=AUTH, timeout=30),
              requests.delete(f"{url}/v1/models", headers=AUTH, timeout=30),
              requests.get(f"{url}/v1/models", timeout=30)]
    assert [r.status_code for r in errors] == [400, 400, 400, 400, 404, 404, 405, 401]
    for r in errors:
        _strict(ErrorObject, r.json()["error"])
    assert [r.json()["error"]["param"] for r in errors[:4]] == ["logprobs", "stream_options", "best_of",
                                                                "messages.0.content"]
