"""Bad-input catalogue for the Serve app over real HTTP on 127.0.0.1 (one deployment, the fixtures
of test_serve): every request field with wrong types, extreme numbers, deep nesting, oversize
bodies, many messages, unicode and control characters in ids. Each case must get a JSON 4xx naming
the problem (never a 5xx, never a path or storage URI), and a valid request is served after each.

python -m pytest tests/cpu/test_serve_catalogue.py -q -x
"""

import http.client
import json

import pytest
import requests

from test_serve import AUTH, cfg_overrides, chat, monkeypatch_module, store, url  # noqa: F401

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
LIMIT = 65536  # serve.max_body_bytes in test_serve's cfg_overrides


def c(**kw):
    return {"messages": HI, **kw}


def nested(depth: int, leaf="x"):
    for _ in range(depth):
        leaf = {"a": leaf}
    return leaf


def chunks(total: int, size: int = 8192):
    for _ in range(total // size):
        yield b" " * size  # whitespace: valid JSON padding, only the size is wrong


CASES = [  # (id, path, body: dict | bytes | generator factory, extra headers, words in the message)
    # wrong types, one per field
    ("model-int", CHAT, c(model=5), {}, "model"),
    ("model-null", CHAT, c(model=None), {}, "model"),
    ("model-list", CHAT, c(model=["GB"]), {}, "model"),
    ("messages-str", CHAT, {"messages": "hi"}, {}, "messages"),
    ("messages-object", CHAT, {"messages": {"role": "user", "content": "hi"}}, {}, "messages"),
    ("messages-item-int", CHAT, {"messages": [5]}, {}, "messages.0"),
    ("messages-missing", CHAT, {"model": "GB"}, {}, "messages"),
    ("role-int", CHAT, {"messages": [{"role": 1, "content": "hi"}]}, {}, "messages.0.role"),
    ("content-parts", CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, {},
     "messages.0.content"),
    ("content-null", CHAT, {"messages": [{"role": "user", "content": None}]}, {}, "messages.0.content"),
    ("max_tokens-str", CHAT, c(max_tokens="5"), {}, "max_tokens"),
    ("max_tokens-float", CHAT, c(max_tokens=5.5), {}, "max_tokens"),
    ("max_tokens-bool", CHAT, c(max_tokens=True), {}, "max_tokens"),
    ("max_completion_tokens-str", CHAT, c(max_completion_tokens="x"), {}, "max_completion_tokens"),
    ("temperature-str", CHAT, c(temperature="0.5"), {}, "temperature"),
    ("top_p-str", CHAT, c(top_p="1"), {}, "top_p"),
    ("n-str", CHAT, c(n="1"), {}, "n"),
    ("stream-str", CHAT, c(stream="yes"), {}, "stream"),
    ("stream-int", CHAT, c(stream=1), {}, "stream"),
    ("stop-int", CHAT, c(stop=5), {}, "stop"),
    ("stop-list-int", CHAT, c(stop=[1]), {}, "stop"),
    ("culture-int", CHAT, c(culture=5), {}, "culture"),
    ("metadata-str", CHAT, c(metadata="MX"), {}, "metadata"),
    ("metadata-list", CHAT, c(metadata=["MX"]), {}, "metadata"),
    ("metadata-value-int", CHAT, c(metadata={"country": 5}), {}, "metadata.country"),
    ("prompt-int", COMPLETIONS, {"prompt": 5}, {}, "prompt"),
    ("prompt-list-int", COMPLETIONS, {"prompt": [["a"]]}, {}, "prompt"),
    ("prompt-missing", COMPLETIONS, {"model": "GB"}, {}, "prompt"),
    ("body-array", CHAT, b"[1, 2]", {}, "JSON object"),
    ("body-null", CHAT, b"null", {}, "JSON object"),
    ("body-empty", CHAT, b"", {}, "malformed JSON"),
    ("body-not-utf8", CHAT, b'{"messages": "\xff"}', {}, "malformed JSON"),
    ("lone-surrogate-content", CHAT, b'{"messages": [{"role": "user", "content": "a\\udc80"}]}', {},
     "messages.0.content"),
    ("lone-surrogate-key", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "metadata": {"\\ud800": "x"}}',
     {}, "metadata"),
    ("content-type-text", CHAT, c(), {"Content-Type": "text/plain"}, "Content-Type"),
    # extreme numbers
    ("max_tokens-zero", CHAT, c(max_tokens=0), {}, "max_tokens"),
    ("max_tokens-negative", CHAT, c(max_tokens=-1), {}, "max_tokens"),
    ("max_tokens-2**63", CHAT, c(max_tokens=2**63), {}, "serve.max_new_tokens"),
    ("max_tokens-10**100", CHAT, c(max_tokens=10**100), {}, "serve.max_new_tokens"),
    ("max_completion_tokens-huge", CHAT, c(max_completion_tokens=10**20), {}, "max_completion_tokens"),
    ("max_tokens-5000-digits", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": '
     + b"9" * 5000 + b"}", {}, "malformed JSON"),
    ("temperature-1e308", CHAT, c(temperature=1e308), {}, "temperature"),
    ("temperature-negative", CHAT, c(temperature=-1e-300), {}, "temperature"),
    ("temperature-1e999", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
     {}, "temperature"),
    ("temperature-NaN", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     {}, "NaN"),
    ("top_p-Infinity", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}',
     {}, "Infinity"),
    ("top_p-zero", CHAT, c(top_p=0), {}, "top_p"),
    ("n-huge", CHAT, c(n=10**30), {}, "n"),
    # deep nesting
    ("nesting-30k", CHAT, b"[" * 30_000 + b"]" * 30_000, {}, "nested too deeply"),
    ("nesting-in-content", CHAT, b'{"messages": [{"role": "user", "content": ' + b"[" * 25_000
     + b"]" * 25_000 + b"}]}", {}, "nested too deeply"),
    ("nesting-metadata", CHAT, c(metadata=nested(200)), {}, "metadata"),
    ("nesting-content-dict", CHAT, {"messages": [{"role": "user", "content": nested(300)}]}, {},
     "messages.0.content"),
    ("nesting-stop", CHAT, c(stop=[[["a"]]]), {}, "stop"),
    # oversize
    ("body-over-limit", CHAT, c(messages=[{"role": "user", "content": "x" * (LIMIT + 10)}]), {},
     "serve.max_body_bytes"),
    ("body-chunked-over-limit", CHAT, lambda: chunks(4 * LIMIT), {}, "serve.max_body_bytes"),
    ("prompt-chars", CHAT, c(messages=[{"role": "user", "content": "x" * 600}]), {},
     "serve.max_prompt_chars"),
    ("prompt-tokens-tiny-messages", CHAT, {"messages": [{"role": "user", "content": "a b c d e f g h"}] * 16},
     {}, "serve.max_prompt_tokens"),
    ("prompt-tokens-completions", COMPLETIONS, {"prompt": "a b " * 120}, {}, "serve.max_prompt_tokens"),
    ("stop-five", CHAT, c(stop=["a"] * 5), {}, "stop"),
    ("stop-long", CHAT, c(stop="s" * 300), {}, "stop"),
    ("metadata-many-keys", CHAT, c(metadata={f"k{i}": "v" for i in range(17)}), {}, "metadata"),
    ("metadata-long-value", CHAT, c(metadata={"note": "v" * 600}), {}, "metadata"),
    ("model-long", CHAT, c(model="G" * 100), {}, "model"),
    ("culture-long", CHAT, c(culture="M" * 100), {}, "culture"),
    # many messages
    ("messages-17", CHAT, {"messages": HI * 17}, {}, "serve.max_messages"),
    ("messages-1000", CHAT, {"messages": [{"role": "user", "content": ""}] * 1000}, {},
     "serve.max_messages"),
    ("messages-empty", CHAT, {"messages": []}, {}, "messages"),
    # unicode and control characters in ids
    ("model-newline", CHAT, c(model="GB\n"), {}, "model"),
    ("model-nul", CHAT, c(model="G\x00B"), {}, "model"),
    ("model-fullwidth", CHAT, c(model="ＧＢ"), {}, "model"),
    ("model-zero-width", CHAT, c(model="GB\u200b"), {}, "model"),
    ("model-cyrillic", CHAT, c(model="ГБ"), {}, "model"),
    ("model-combining", CHAT, c(model="MX\u0301"), {}, "model"),
    ("model-bidi", CHAT, c(model="\u202eGB"), {}, "model"),
    ("model-empty", CHAT, c(model=""), {}, "model"),
    ("culture-newline", CHAT, c(culture="MX\n"), {}, "culture"),
    ("culture-nul", CHAT, c(culture="M\x00X"), {}, "culture"),
    ("culture-fullwidth", CHAT, c(culture="ＭＸ"), {}, "culture"),
    ("culture-emoji", CHAT, c(culture="🇲🇽"), {}, "culture"),
    ("x-culture-utf8", CHAT, c(), {"X-Culture": "ÉS".encode()}, "X-Culture"),
    ("x-culture-latin1", CHAT, c(), {"X-Culture": "M\xe9X".encode("latin-1")}, "X-Culture"),
    ("metadata-country-control", CHAT, c(metadata={"country": "Me\x01xico"}), {}, "metadata"),
    ("metadata-country-fullwidth", CHAT, c(metadata={"country": "ＭＸ"}), {}, "metadata"),
    ("metadata-country-unknown", CHAT, c(metadata={"country": "Narnia"}), {}, "metadata"),
    ("metadata-language-newline", CHAT, c(metadata={"language": "es\n"}), {}, "metadata"),
    ("metadata-language-unicode", CHAT, c(metadata={"language": "español"}), {}, "metadata"),
    ("metadata-key-nul", CHAT, c(metadata={"\x00": "a"}), {}, "metadata"),
    ("metadata-value-zero-width", CHAT, c(metadata={"country": "MX\u200b"}), {}, "metadata"),
]


# -- the checks themselves, without Serve -------------------------------------------------------


def test_ids_are_matched_whole_so_a_trailing_newline_is_refused():
    from cm_ray.serve.api import ApiError, check_adapter_id

    assert check_adapter_id("gb") == "GB" and check_adapter_id("_joint") == "_joint"
    for bad in ("GB\n", "GB\r\n", "\nGB", "ＧＢ", "GB\u200b", "G" * 65):
        with pytest.raises(ApiError, match="letters, digits") as e:
            check_adapter_id(bad, "culture")
        assert e.value.status == 400 and e.value.param == "culture"


def test_scrub_removes_the_root_uris_and_local_paths():
    from cm_ray.serve.api import scrub

    msg = ("adapter 'BR' could not be loaded: HFValidationError: Repo id must be in the form "
           "'repo_name': '/tmp/tmpab12/adapter-BR-x9'; store s3://bkt/run-1/adapters/BR; "
           "file:///srv/data/x; C:\\Users\\me\\a.bin; at /work/runs/demo/adapters/BR")
    out = scrub(msg, "s3://bkt/run-1", "/work/runs/demo")
    for leak in ("/tmp", "s3://", "bkt", "file://", "Users", "/work", "run-1"):
        assert leak not in out, out
    assert "adapter 'BR' could not be loaded: HFValidationError" in out
    kept = "model: '../GB' must not contain path separators or '..'"
    assert scrub(kept) == kept


def test_prompt_tokens_count_the_rendered_chat_not_characters(tiny_model_dir):
    from transformers import AutoTokenizer

    from cm_ray.serve.api import ApiError, ChatRequest, check_prompt_tokens

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    one = ChatRequest.model_validate({"messages": [{"role": "user", "content": "a b c d e f g h"}]})
    many = ChatRequest.model_validate({"messages": [{"role": "user", "content": "a b c d e f g h"}] * 16})
    assert many.chars() == 16 * one.chars() == 240  # few characters ...
    n1 = check_prompt_tokens(one, tok, 1000)
    text = tok.apply_chat_template(many.payload()["messages"], tokenize=False, add_generation_prompt=True)
    assert check_prompt_tokens(many, tok, 1000) == len(tok(text, add_special_tokens=False)["input_ids"]) > 5 * n1
    with pytest.raises(ApiError, match=r"serve\.max_prompt_tokens") as e:  # ... many tokens
        check_prompt_tokens(many, tok, 120)
    assert e.value.status == 400


# -- the catalogue over HTTP ----------------------------------------------------------------------


def _post(url, path, body, headers):
    h = {**AUTH, "Content-Type": "application/json", **headers}
    if callable(body):
        return requests.post(f"{url}{path}", data=body(), headers=h, timeout=60)
    if isinstance(body, bytes):
        return requests.post(f"{url}{path}", data=body, headers=h, timeout=60)
    return requests.post(f"{url}{path}", data=json.dumps(body).encode(), headers=h, timeout=60)


def _assert_json_4xx(r, words):
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert words in err["message"], err
    assert err["code"] is None or isinstance(err["code"], str)  # OpenAI's schema: a string or null
    for leak in ("s3://", "/tmp", "Traceback"):
        assert leak not in err["message"], err


def _assert_still_serves(url):
    r = chat(url, "hello", model="GB", max_tokens=2)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["choices"][0]["message"]["content"], str)


@pytest.mark.parametrize("path,body,headers,words", [x[1:] for x in CASES], ids=[x[0] for x in CASES])
def test_bad_input_is_a_json_4xx_and_the_app_keeps_serving(url, path, body, headers, words):
    _assert_json_4xx(_post(url, path, body, headers), words)
    _assert_still_serves(url)


def test_oversize_body_is_refused_from_content_length_before_it_is_sent(url):
    """A 50 MB Content-Length gets its 413 while the client has sent none of the body."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", CHAT)
    for k, v in {**AUTH, "Content-Type": "application/json", "Content-Length": str(50 << 20)}.items():
        conn.putheader(k, v)
    conn.endheaders()
    conn.send(b'{"messages": ')  # a few bytes, never the 50 MB
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    assert r.status == 413 and "serve.max_body_bytes" in body["error"]["message"], body
    _assert_still_serves(url)


def test_control_characters_in_a_header_are_refused_before_the_app(url):
    """The HTTP parser (uvicorn) refuses them with its own plain 400: a 4xx, never a 5xx."""
    r = requests.post(f"{url}{CHAT}", json=c(), headers={**AUTH, "X-Culture": "M\x01X"}, timeout=60)
    assert r.status_code == 400, r.text
    _assert_still_serves(url)


def test_the_catalogue_left_no_5xx(url):
    metrics = requests.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    assert 'status="200"' in metrics and 'status="5' not in metrics
