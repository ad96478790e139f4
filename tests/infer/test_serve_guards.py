"""A real uvicorn server under slow, stalled, oversized and malformed clients: it frees them and /health answers.

Stalled clients are raw sockets: they send part of a request and then nothing.
"""
import copy
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from engine import Tokenizer, Transformer  # noqa: E402
from engine.infer.serve.app import ServeLimits, create_app  # noqa: E402
from engine.infer.serve.batcher import Batcher  # noqa: E402
from engine.infer.serve.guards import HEALTH_RESERVE  # noqa: E402
from engine.infer.serve.render import ChatRenderer  # noqa: E402
from tests.hf_models import save_demo_model  # noqa: E402
from tests.infer.test_serve import running  # noqa: E402

CAP = 4
LIMITS = ServeLimits(max_prompt_tokens=64, max_tokens=16, max_body_bytes=1 << 20, header_timeout_s=1.0,
                     body_timeout_s=1.0, max_connections=CAP, template_timeout_s=1.0, max_template_chars=100_000)
# One template, four ways to misbehave, picked by the first message (a real model ships one of them).
EVIL_TEMPLATE = (
    "{% set c = messages[0]['content'] %}"
    "{% if c == 'loop' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% elif c == 'memory' %}{{ 'x' * 10**10 }}"
    "{% elif c == 'long' %}{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}"
    "{% elif c == 'reject' %}{{ raise_exception('Conversation roles must alternate') }}"
    "{% else %}[user] {{ c }} [assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_guards_demo")
    save_demo_model(d)
    return Transformer.from_pretrained(d).eval(), Tokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def server(demo):
    model, tok = demo
    evil = copy.copy(tok)
    evil.chat_templates = {"default": EVIL_TEMPLATE}
    app = create_app(Batcher(model, max_batch=4, max_len=128), evil, "demo", limits=LIMITS)
    with running(app) as url:
        yield url, app


def raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    start, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - start


def timed_get(url: str, path: str = "/health") -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = httpx.get(url + path, timeout=10)
    return r, time.monotonic() - start


def stalled_body(url: str) -> socket.socket:
    sock = raw(url)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\": ")  # ... and the other 90 bytes never come
    return sock


def test_stalled_bodies_fill_the_cap_get_408_after_the_body_timeout_and_health_answers_meanwhile(server):
    url, _ = server
    stalled = [stalled_body(url) for _ in range(CAP)]
    time.sleep(0.2)  # let the server take them in
    busy = httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 1}, timeout=10)
    assert busy.status_code == 503 and busy.json()["error"]["code"] == "server_busy"
    health, seconds = timed_get(url)  # answered from the connections kept for /health
    assert health.status_code == 200 and seconds < 1
    more = [stalled_body(url) for _ in range(40)]  # beyond the cap: answered 503 and closed at once
    for sock in more:
        data, seconds = until_closed(sock)
        assert data.startswith(b"HTTP/1.1 503") and seconds < 2, data  # not held until the body timeout
        sock.close()
    for sock in stalled:
        data, seconds = until_closed(sock)
        assert data.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in data, data
        assert seconds < 3
        sock.close()
    r = httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 1,
                                                  "temperature": 0}, timeout=10)
    assert r.status_code == 200  # the cap is free again


def test_stalled_headers_are_closed_after_the_header_timeout(server):
    url, _ = server
    fresh = raw(url)
    fresh.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # no blank line: the headers never end
    kept_alive = raw(url)
    kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    response = b""
    while not response.endswith(b"}"):  # the whole JSON response, so what follows is the server closing
        response += kept_alive.recv(65536)
    assert response.startswith(b"HTTP/1.1 200")
    kept_alive.sendall(b"GET /health HTTP/1.1\r\nHo")  # the next request on the connection stalls
    health, seconds = timed_get(url)
    assert health.status_code == 200 and seconds < 1
    for sock in (fresh, kept_alive):
        data, seconds = until_closed(sock)
        assert data == b"" and seconds < 3
        sock.close()


def test_connections_beyond_the_hard_cap_get_503_until_the_header_timeout_frees_them(server):
    url, _ = server
    idle = [raw(url) for _ in range(CAP + HEALTH_RESERVE)]  # connect, send nothing
    time.sleep(0.2)
    try:
        assert httpx.get(url + "/health", timeout=10).status_code == 503  # uvicorn's own cap
        time.sleep(LIMITS.header_timeout_s + 0.5)
        health, seconds = timed_get(url)
        assert health.status_code == 200 and seconds < 1
    finally:
        for sock in idle:
            sock.close()


def test_a_huge_prompt_is_tokenized_off_the_event_loop(server):
    url, _ = server
    prompt = "hello world, the quick brown fox " * 28_000  # ~0.9 MB
    result = {}

    def post():
        start = time.monotonic()
        result["r"] = httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": prompt, "max_tokens": 1},
                                 timeout=60)
        result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=post)
    thread.start()
    latencies = []
    while thread.is_alive():
        latencies.append(timed_get(url)[1])
    thread.join()
    assert result["r"].status_code == 400 and "tokens" in result["r"].json()["error"]["message"]
    # On the event loop, tokenizing would hold every /health for the whole request. Off it, /health answers
    # many times meanwhile; on a loaded machine each answer may be slow, but not as slow as the request.
    typical = sorted(latencies)[len(latencies) // 2]
    assert len(latencies) >= 2 and (max(latencies) < 0.5 or typical < 0.25 * result["seconds"]), \
        (latencies, result["seconds"])


def test_looping_chat_templates_are_stopped_while_health_and_completions_answer(server):
    url, app = server
    results = []

    def chat():
        start = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", timeout=30,
                       json={"model": "demo", "messages": [{"role": "user", "content": "loop"}]})
        results.append((r, time.monotonic() - start))

    threads = [threading.Thread(target=chat) for _ in range(3)]  # they render one after another: ~3 s in all
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # the first render is running
    health, seconds = timed_get(url)
    assert health.status_code == 200 and seconds < 1
    start = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 2, "temperature": 0},
                   timeout=10)
    assert r.status_code == 200 and time.monotonic() - start < 1
    assert threads[-1].is_alive()  # all of that happened while the templates were still looping
    for thread in threads:
        thread.join()
    for r, seconds in results:
        error = r.json()["error"]
        assert r.status_code == 500 and error["code"] == "chat_template_failed", error
        assert "did not finish rendering within 1 s" in error["message"] and seconds < 8
    assert app.state.renderer.restarts >= 3
    # The killed render process is replaced: the next conversation renders.
    r = httpx.post(url + "/v1/chat/completions", timeout=30,
                   json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("content, status, message", [
    pytest.param("memory", 500, "MiB of memory",
                 marks=pytest.mark.skipif(sys.platform != "linux", reason="the memory cap is RLIMIT_AS (Linux)")),
    ("long", 500, "rendered 10000000 characters; this server's limit is 100000"),
    ("reject", 400, "Conversation roles must alternate"),
])
def test_chat_template_bounds_and_errors(server, content, status, message):
    url, _ = server
    r = httpx.post(url + "/v1/chat/completions", timeout=30,
                   json={"model": "demo", "messages": [{"role": "user", "content": content}]})
    assert r.status_code == status and message in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("body, param", [
    ('{"model": "demo", "prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ('{"model": "demo", "prompt": ["\\udfff"], "max_tokens": 1}', "prompt[0]"),
    ('{"model": "demo", "prompt": "hi", "stop": ["\\ud800"], "max_tokens": 1}', "stop[0]"),
    ('{"model": "\\ud800", "prompt": "hi"}', "model"),
    ('{"model": "demo", "messages": [{"role": "user", "content": "\\udc00"}]}', "messages[0].content"),
    ('{"model": "demo", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages[0].content[0].text"),
    ('{"model": "demo", "messages": [{"role": "user", "content": "x", "name": "\\ud800"}]}', "messages[0].name"),
])
def test_lone_surrogates_get_400_naming_the_field(server, body, param):
    url, _ = server
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(url + path, content=body.encode(), headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "lone UTF-16 surrogate" in error["message"], error


def test_a_deeply_nested_body_gets_400_not_a_recursion_error(server):
    url, _ = server
    body = ('{"model": "demo", "messages": [{"role": "user", "content": "x", "extra": ' + "[" * 900 + "]" * 900
            + "}]}")
    r = httpx.post(url + "/v1/chat/completions", content=body.encode(), timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].endswith("nested more than 32 arrays/objects deep"), r.text


def test_a_valid_surrogate_pair_is_text(server):
    url, _ = server
    body = '{"model": "demo", "prompt": "\\ud83d\\ude00", "max_tokens": 1, "temperature": 0}'
    r = httpx.post(url + "/v1/completions", content=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text


def test_content_type_missing_is_read_as_json_and_another_gets_415(server):
    url, _ = server
    body = json.dumps({"model": "demo", "prompt": "hi", "max_tokens": 1, "temperature": 0}).encode()
    assert "content-type" not in httpx.Request("POST", url, content=body).headers
    assert httpx.post(url + "/v1/completions", content=body).status_code == 200
    r = httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    r = httpx.post(url + "/v1/completions", content=body,
                   headers={"Content-Type": "application/x-www-form-urlencoded"})  # what `curl -d` sends
    assert r.status_code == 415
    assert r.json()["error"]["message"] == ("Content-Type: expected application/json, got "
                                            "'application/x-www-form-urlencoded'")


def test_a_model_without_a_chat_template_says_so_at_start_up_and_chat_gets_400(demo, caplog):
    model, tok = demo
    plain = copy.copy(tok)
    plain.chat_templates = {}
    with caplog.at_level(logging.WARNING, logger="engine.infer.serve"):
        app = create_app(Batcher(model, max_batch=1, max_len=64), plain, "demo")
    lines = [r.getMessage() for r in caplog.records if "chat" in r.getMessage()]
    assert len(lines) == 1 and "no chat template" in lines[0] and "will answer 400" in lines[0], lines
    with running(app) as url:
        r = httpx.post(url + "/v1/chat/completions", json={"model": "demo", "messages": [{"role": "user",
                                                                                         "content": "hi"}]})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists descriptors through /proc")
def test_the_render_process_holds_none_of_the_servers_sockets(demo):
    """A client socket the child kept open would stay connected after the server closed it."""
    renderer = ChatRenderer(demo[1])
    try:
        with socket.socket() as listening:
            listening.bind(("127.0.0.1", 0))
            listening.listen()
            assert renderer.render([{"role": "user", "content": "hi"}]) == demo[1].apply_chat_template(
                [{"role": "user", "content": "hi"}], add_generation_prompt=True)
            fds = sorted(int(fd) for fd in os.listdir(f"/proc/{renderer.pid}/fd"))
    finally:
        renderer.close()
    assert fds[:3] == [0, 1, 2] and len(fds) == 4, fds  # stdio and its pipe to the server


def test_a_render_process_that_died_between_requests_is_replaced(demo):
    renderer = ChatRenderer(demo[1])
    messages = [{"role": "user", "content": "hi"}]
    try:
        expected = renderer.render(messages)
        dead = renderer.pid
        os.kill(dead, signal.SIGKILL)
        os.waitpid(dead, 0)
        assert renderer.render(messages) == expected and renderer.pid != dead
    finally:
        renderer.close()
