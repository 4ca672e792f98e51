"""Real OpenAI clients against the Serve app (transformers engine, test_serve's fixtures, one
deployment for the module): the official ``openai`` client (incl. ``models.retrieve``),
LangChain's ``ChatOpenAI`` and LiteLLM, each with a plain, a streamed and an async call.

python -m pytest tests/cpu/test_openai_clients.py -q
"""

import asyncio
import os

from test_serve import KEY, cfg_overrides, monkeypatch_module, store, url  # noqa: F401

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of a price list
MSG = [{"role": "user", "content": "Tell me about tea"}]


def test_the_official_openai_client(url):
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert client.models.retrieve("MX").id == "MX"
    assert {"auto", "base", "GB"} <= {m.id for m in client.models.list()}
    r = client.chat.completions.create(model="GB", messages=MSG, max_tokens=4)
    assert r.choices[0].message.role == "assistant" and r.system_fingerprint.startswith("cm_ray-")
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="GB", messages=MSG, max_tokens=4, stream=True) if c.choices)
    assert text == r.choices[0].message.content
    c = client.completions.create(model="MX", prompt=["Hola", "Adiós"], max_tokens=3, n=2)
    assert len(c.choices) == 4

    async def main():
        a = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
        return await a.chat.completions.create(model="GB", messages=MSG, max_tokens=4)

    assert asyncio.run(main()).choices[0].message.content == r.choices[0].message.content
    try:
        client.models.retrieve("ZZ")
        raise AssertionError("no error for an unknown model")
    except openai.NotFoundError as e:
        assert e.code == "model_not_found"


def test_langchain_chat_openai(url):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="GB", base_url=f"{url}/v1", api_key=KEY, max_retries=0, max_tokens=4,
                     temperature=0)
    plain = llm.invoke("Tell me about tea").content
    assert isinstance(plain, str)
    assert "".join(chunk.content for chunk in llm.stream("Tell me about tea")) == plain
    assert asyncio.run(llm.ainvoke("Tell me about tea")).content == plain
    msgs = [("system", "Be brief."), ("human", "Tell me about tea")]
    assert isinstance(llm.invoke(msgs).content, str)


def test_litellm(url):
    import litellm

    kw = {"model": "openai/GB", "api_base": f"{url}/v1", "api_key": KEY, "messages": MSG, "max_tokens": 4}
    plain = litellm.completion(**kw).choices[0].message.content
    assert isinstance(plain, str)
    text = "".join(c.choices[0].delta.content or "" for c in litellm.completion(**kw, stream=True) if c.choices)
    assert text == plain
    assert asyncio.run(litellm.acompletion(**kw)).choices[0].message.content == plain
