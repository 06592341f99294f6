"""crux_workers.ai against a real chat-completions server on 127.0.0.1, and in a flow."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import BaseModel

import crux_workers.ai
from crux_workers import NonRetryableError, Retry
from crux_workers.ai import (
    AsyncModel,
    Message,
    Model,
    ModelError,
    ModelHTTPError,
    ModelRequestRejected,
    ModelResponseError,
    ModelTimeout,
    OpenAICompatible,
    generate,
    generate_async,
)
from crux_workers.errors import ConfigurationError, InvalidInput
from tests.support.harness import Harness

KEY = "sk-test-0123456789abcdef"


# -- a chat-completions server -----------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes | None = None  # None: a completion of `text`
    text: str = "a reply"
    delay: float = 0.0
    content_type: str = "application/json"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class ChatServer:
    url: str
    replies: list[Reply] = field(default_factory=list)  # served in order, then the default
    received: list[Received] = field(default_factory=list)

    def next_reply(self) -> Reply:
        return self.replies.pop(0) if self.replies else Reply()


def completion(text: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
        }
    ).encode()


def error_body(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that gave up (the timeout test) is expected, not news


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ChatServer]:
    # A proxy from the environment would take loopback requests elsewhere.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("all_proxy", raising=False)

    state: dict[str, ChatServer] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            chat = state["chat"]
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw
            chat.received.append(Received(self.path, dict(self.headers.items()), body))
            reply = chat.next_reply()
            time.sleep(reply.delay)
            payload = completion(reply.text) if reply.body is None else reply.body
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                pass

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = _QuietServer(("127.0.0.1", 0), Handler)
    host, port = httpd.server_address[:2]
    state["chat"] = ChatServer(url=f"http://{host!s}:{port}")
    thread = threading.Thread(
        target=httpd.serve_forever, args=(0.02,), name="chat-server", daemon=True
    )
    thread.start()
    try:
        yield state["chat"]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def provider(server: ChatServer, **kwargs: Any) -> OpenAICompatible:
    return OpenAICompatible(server.url, "test-model", **kwargs)


def ask(mode: str, prompt: str, **kwargs: Any) -> str:
    """``generate``, or ``generate_async`` run on a fresh loop: both must behave alike."""
    if mode == "sync":
        return generate(prompt, **kwargs)
    return asyncio.run(generate_async(prompt, **kwargs))


both = pytest.mark.parametrize("mode", ["sync", "async"])


class FakeModel:
    def __init__(self, reply: Any = "fake reply") -> None:
        self.reply = reply
        self.calls: list[list[Message]] = []

    def complete(self, messages: list[Message]) -> str:
        self.calls.append(messages)
        return self.reply  # type: ignore[no-any-return]


class Brief(BaseModel):
    topic: str
    words: int
    due: date


class Author(BaseModel):
    name: str


class Article(BaseModel):
    title: str
    author: Author


# -- the provider ------------------------------------------------------------------------


@both
def test_generate_posts_a_chat_completion_and_returns_its_text(
    mode: str, server: ChatServer
) -> None:
    server.replies.append(Reply(text="Durable flows, explained."))
    model = provider(server, api_key=KEY)

    text = ask(
        mode, "Write about {topic}", model=model, input={"topic": "flows"}, system="Be brief"
    )

    assert text == "Durable flows, explained."
    [request] = server.received
    assert request.path == "/v1/chat/completions"
    assert request.body == {
        "model": "test-model",
        "messages": [
            {"role": "system", "content": "Be brief"},
            {"role": "user", "content": "Write about flows"},
        ],
    }
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    assert request.headers["Content-Type"] == "application/json"


@both
def test_no_authorization_header_is_sent_without_an_api_key(mode: str, server: ChatServer) -> None:
    assert ask(mode, "hello", model=provider(server)) == "a reply"
    assert "Authorization" not in server.received[0].headers
    assert server.received[0].body["messages"] == [{"role": "user", "content": "hello"}]


@both
def test_request_options_and_headers_are_passed_through(mode: str, server: ChatServer) -> None:
    model = provider(
        server,
        temperature=0.2,
        max_tokens=64,
        extra_body={"seed": 7, "stop": ["\n\n"]},
        headers={"X-Team": "docs"},
    )
    ask(mode, "hi", model=model)
    [request] = server.received
    assert request.body["temperature"] == 0.2
    assert request.body["max_tokens"] == 64
    assert request.body["seed"] == 7 and request.body["stop"] == ["\n\n"]
    assert request.headers["X-Team"] == "docs"


@pytest.mark.parametrize(
    ("base_url", "endpoint"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1/chat/completions"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1/chat/completions"),
        ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1/chat/completions"),
        ("http://127.0.0.1:8080/v1/", "http://127.0.0.1:8080/v1/chat/completions"),
        ("https://gw.example/openai", "https://gw.example/openai/v1/chat/completions"),
        ("https://gw.example/api/v1", "https://gw.example/api/v1/chat/completions"),
        (
            "https://gw.example/v1beta/chat/completions",
            "https://gw.example/v1beta/chat/completions",
        ),
        ("https://gw.example/x?key=1", "https://gw.example/x/v1/chat/completions?key=1"),
    ],
)
def test_base_url_with_or_without_v1_gives_the_chat_completions_endpoint(
    base_url: str, endpoint: str
) -> None:
    assert OpenAICompatible(base_url, "m").url == endpoint


def test_a_base_url_already_ending_in_v1_is_posted_to_once(server: ChatServer) -> None:
    generate("hi", model=OpenAICompatible(server.url + "/v1/", "m"))
    assert server.received[0].path == "/v1/chat/completions"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_url": "127.0.0.1:8080"},
        {"base_url": "ftp://127.0.0.1"},
        {"model": ""},
        {"timeout": 0},
        {"timeout": "30"},
        {"extra_body": {"model": "other"}},
        {"api_key": "line\nbreak"},
    ],
)
def test_invalid_provider_settings_are_refused_where_they_are_given(kwargs: Any) -> None:
    args = {"base_url": "http://127.0.0.1:1", "model": "m", **kwargs}
    with pytest.raises(ConfigurationError):
        OpenAICompatible(args.pop("base_url"), args.pop("model"), **args)


# -- templates ---------------------------------------------------------------------------


def test_template_is_filled_from_a_dict() -> None:
    fake = FakeModel()
    generate(
        "Summarise {doc.title} by {doc.author} in {n:03d} words; keep {{braces}}",
        model=fake,
        input={"doc": {"title": "Flows", "author": "Ada"}, "n": 50},
    )
    assert fake.calls[0][-1]["content"] == "Summarise Flows by Ada in 050 words; keep {braces}"


def test_template_is_filled_from_a_pydantic_model_including_the_system_prompt() -> None:
    fake = FakeModel()
    generate(
        "Write {words} words about {topic!r} by {due:%d %B}",
        model=fake,
        input=Brief(topic="replay", words=300, due=date(2026, 12, 1)),
        system="You write about {topic}.",
    )
    assert fake.calls[0] == [
        {"role": "system", "content": "You write about replay."},
        {"role": "user", "content": "Write 300 words about 'replay' by 01 December"},
    ]


def test_nested_models_are_reached_with_dotted_names() -> None:
    fake = FakeModel()
    article = Article(title="Leases", author=Author(name="Grace"))
    generate("{title} by {author.name}", model=fake, input=article)
    generate("{a.title} by {a.author.name}", model=fake, input={"a": article})
    assert [c[-1]["content"] for c in fake.calls] == ["Leases by Grace"] * 2


def test_a_missing_placeholder_is_invalid_input_naming_it(server: ChatServer) -> None:
    with pytest.raises(InvalidInput) as caught:
        generate("Write about {topic} for {audience}", model=provider(server), input={"topic": "x"})
    assert "{audience}" in str(caught.value) and "topic" in str(caught.value)
    assert caught.value.placeholder == "audience"  # type: ignore[attr-defined]
    assert server.received == []  # nothing was sent


def test_a_missing_nested_placeholder_names_where_it_looked() -> None:
    with pytest.raises(InvalidInput, match=r"\{author\.email\}.*author has no field 'email'"):
        generate(
            "{author.email}",
            model=FakeModel(),
            input=Article(title="t", author=Author(name="n")),
        )


@pytest.mark.parametrize(
    "template",
    ["{}", "{0}", "{items[0]}", "{topic.__class__}", "unclosed {topic", "stray } brace"],
)
def test_positional_indexed_private_or_malformed_placeholders_are_refused(template: str) -> None:
    with pytest.raises(InvalidInput):
        generate(template, model=FakeModel(), input={"topic": "x", "items": [1]})


def test_a_format_spec_the_value_refuses_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="malformed"):
        generate("{topic:.2f}", model=FakeModel(), input={"topic": "x"})


def test_without_input_the_prompt_is_sent_as_written() -> None:
    fake = FakeModel()
    generate('Return {"ok": true} as JSON', model=fake)
    assert fake.calls[0][-1]["content"] == 'Return {"ok": true} as JSON'


def test_input_must_be_a_dict_or_a_model() -> None:
    with pytest.raises(InvalidInput, match="dict or a pydantic model"):
        generate("{x}", model=FakeModel(), input=["x"])  # type: ignore[arg-type]


# -- the Model protocol ------------------------------------------------------------------


def test_any_object_with_complete_is_a_model() -> None:
    assert isinstance(FakeModel(), Model)
    assert isinstance(OpenAICompatible("http://127.0.0.1:1", "m"), Model)
    with pytest.raises(InvalidInput, match="complete"):
        generate("hi", model=object())  # type: ignore[arg-type]


def test_a_model_returning_something_else_than_text_is_a_response_error() -> None:
    with pytest.raises(ModelResponseError, match="returned dict"):
        generate("hi", model=FakeModel(reply={"text": "x"}))


# -- generate_async --------------------------------------------------------------------


class FakeAsyncModel:
    def __init__(self, reply: Any = "async reply") -> None:
        self.reply = reply
        self.loops: list[asyncio.AbstractEventLoop] = []

    async def complete_async(self, messages: list[Message]) -> str:
        self.loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        if not isinstance(self.reply, str):
            return self.reply  # type: ignore[no-any-return]  # a broken contract, on purpose
        return f"{self.reply}: {messages[-1]['content']}"


def test_generate_async_awaits_an_async_model_on_the_callers_loop() -> None:
    model = FakeAsyncModel()
    assert isinstance(model, AsyncModel) and not isinstance(model, Model)

    async def main() -> tuple[str, asyncio.AbstractEventLoop]:
        text = await generate_async("Hi {name}", model=model, input={"name": "Ada"})
        return text, asyncio.get_running_loop()

    text, loop = asyncio.run(main())
    assert text == "async reply: Hi Ada"
    assert model.loops == [loop]
    assert isinstance(OpenAICompatible("http://127.0.0.1:1", "m"), AsyncModel)


def test_generate_async_calls_a_sync_model_off_the_loop() -> None:
    threads: list[str] = []

    class Blocking(FakeModel):
        def complete(self, messages: list[Message]) -> str:
            threads.append(threading.current_thread().name)
            return super().complete(messages)

    async def main() -> str:
        threads.append(threading.current_thread().name)
        return await generate_async("hi", model=Blocking("sync reply"), system="be kind")

    assert asyncio.run(main()) == "sync reply"
    loop_thread, model_thread = threads
    assert loop_thread != model_thread


def test_generate_async_refuses_what_is_not_a_model_and_checks_the_reply() -> None:
    with pytest.raises(InvalidInput, match="complete_async"):
        asyncio.run(generate_async("hi", model=object()))  # type: ignore[arg-type]
    with pytest.raises(ModelResponseError, match=r"complete_async returned dict"):
        asyncio.run(generate_async("hi", model=FakeAsyncModel(reply={"x": 1})))
    with pytest.raises(ModelResponseError, match=r"complete returned int"):
        asyncio.run(generate_async("hi", model=FakeModel(reply=3)))
    with pytest.raises(InvalidInput, match="placeholder"):
        asyncio.run(generate_async("hi {who}", model=FakeAsyncModel(), input={}))


def test_waiting_on_the_async_client_leaves_the_loop_free(server: ChatServer) -> None:
    server.replies += [Reply(delay=0.3, text=f"reply {i}") for i in range(3)]
    model = provider(server)
    ticks = 0

    async def ticker(done: asyncio.Event) -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    async def main() -> list[str]:
        done = asyncio.Event()
        ticking = asyncio.create_task(ticker(done))
        try:
            return await asyncio.gather(*[generate_async(f"q{i}", model=model) for i in range(3)])
        finally:
            done.set()
            await ticking

    started = time.monotonic()
    replies = asyncio.run(main())
    # Three 0.3 s answers awaited together: one after another they would take 0.9 s.
    assert time.monotonic() - started < 0.9
    assert sorted(replies) == ["reply 0", "reply 1", "reply 2"]
    assert ticks >= 5  # the loop kept running other tasks while the requests waited


# -- errors ------------------------------------------------------------------------------


@both
def test_http_500_is_a_retryable_model_http_error_with_status_and_body(
    mode: str,
    server: ChatServer,
) -> None:
    server.replies.append(Reply(status=500, body=b"upstream exploded", content_type="text/plain"))
    with pytest.raises(ModelHTTPError) as caught:
        ask(mode, "hi", model=provider(server))
    err = caught.value
    assert err.status == 500  # type: ignore[attr-defined]
    assert err.body == "upstream exploded"  # type: ignore[attr-defined]
    assert "HTTP 500" in str(err) and "upstream exploded" in str(err)
    assert not isinstance(err, NonRetryableError)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
@both
def test_transient_statuses_are_retryable(mode: str, server: ChatServer, status: int) -> None:
    server.replies.append(Reply(status=status, body=error_body("slow down")))
    with pytest.raises(ModelHTTPError) as caught:
        ask(mode, "hi", model=provider(server))
    assert caught.value.status == status  # type: ignore[attr-defined]
    assert not isinstance(caught.value, NonRetryableError)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
@both
def test_other_client_errors_are_rejected_without_retry(
    mode: str, server: ChatServer, status: int
) -> None:
    server.replies.append(Reply(status=status, body=error_body("context length exceeded")))
    with pytest.raises(ModelRequestRejected) as caught:
        ask(mode, "hi", model=provider(server))
    err = caught.value
    assert isinstance(err, ModelHTTPError) and isinstance(err, NonRetryableError)
    assert err.status == status  # type: ignore[attr-defined]
    assert str(err).endswith(": context length exceeded")


@both
def test_long_error_bodies_are_truncated(mode: str, server: ChatServer) -> None:
    server.replies.append(Reply(status=503, body=b"x" * 50_000, content_type="text/plain"))
    with pytest.raises(ModelHTTPError) as caught:
        ask(mode, "hi", model=provider(server))
    assert len(caught.value.body) == 1000  # type: ignore[attr-defined]
    assert len(str(caught.value)) < 400


@both
def test_the_api_key_never_appears_in_errors_or_reprs(mode: str, server: ChatServer) -> None:
    server.replies.append(Reply(status=401, body=error_body(f"bad key {KEY}")))
    model = provider(server, api_key=KEY)
    with pytest.raises(ModelRequestRejected) as caught:
        ask(mode, "hi", model=model)
    assert KEY not in str(caught.value) and KEY not in caught.value.body  # type: ignore[attr-defined]
    assert "bad key [redacted]" in str(caught.value)
    assert KEY not in repr(model)


@both
def test_a_server_slower_than_the_timeout_is_a_model_timeout(mode: str, server: ChatServer) -> None:
    server.replies.append(Reply(delay=0.6))
    started = time.monotonic()
    with pytest.raises(ModelTimeout) as caught:
        ask(mode, "hi", model=provider(server, timeout=0.2))
    assert time.monotonic() - started < 0.55
    assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, ModelError)
    assert not isinstance(caught.value, NonRetryableError)


@both
def test_an_unreachable_server_is_a_retryable_model_error(
    mode: str,
) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ModelError, match="could not reach") as caught:
        ask(mode, "hi", model=OpenAICompatible(f"http://user:pw@127.0.0.1:{port}", "m"))
    assert not isinstance(caught.value, NonRetryableError)
    assert "pw" not in str(caught.value)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"<html>oops</html>", "not JSON"),
        (b'{"choices": [', "not JSON"),
        (b"[]", "not an object"),
        (b'{"choices": []}', "without choices"),
        (b'{"error": {"message": "model not loaded"}}', "without choices: model not loaded"),
        (b'{"choices": [{"message": {"content": null}, "finish_reason": "tool_calls"}]}', "tool"),
        (b'{"choices": ["text"]}', "without text content"),
    ],
)
@both
def test_a_reply_that_is_not_a_completion_is_a_non_retryable_response_error(
    mode: str, server: ChatServer, body: bytes, match: str
) -> None:
    server.replies.append(Reply(body=body))
    with pytest.raises(ModelResponseError, match=match) as caught:
        ask(mode, "hi", model=provider(server))
    assert isinstance(caught.value, NonRetryableError)


def test_without_httpx_the_provider_asks_for_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "httpx", None)  # makes `import httpx` fail
    with pytest.raises(ConfigurationError, match=r"pip install 'crux_workers\[ai\]'"):
        OpenAICompatible("http://127.0.0.1:1", "m")


def test_importing_crux_workers_ai_does_not_need_httpx() -> None:
    code = (
        "import sys; sys.modules['httpx'] = None\n"
        "from crux_workers.ai import generate, OpenAICompatible\n"
        "class Echo:\n"
        "    def complete(self, messages): return messages[-1]['content']\n"
        "print(generate('hi {x}', model=Echo(), input={'x': 1}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "hi 1"


def test_public_names_are_pinned() -> None:
    assert sorted(crux_workers.ai.__all__) == sorted(
        [
            "AsyncModel",
            "Message",
            "Model",
            "ModelError",
            "ModelHTTPError",
            "ModelRequestRejected",
            "ModelResponseError",
            "ModelTimeout",
            "OpenAICompatible",
            "TemplateInput",
            "generate",
            "generate_async",
        ]
    )
    for name in crux_workers.ai.__all__:
        assert getattr(crux_workers.ai, name).__doc__, name


# -- in a flow ---------------------------------------------------------------------------


class Topic(BaseModel):
    topic: str


def test_a_transient_500_is_retried_by_the_step_and_the_flow_completes(
    h: Harness, server: ChatServer
) -> None:
    server.replies += [Reply(status=500, body=b"overloaded"), Reply(text="A draft about tides")]
    model = provider(server)

    @h.app.flow("drafting", input=Topic)
    def drafting(f: Any) -> Any:
        return f.step(
            "draft",
            lambda: generate("Write about {topic}", model=model, input=f.input),
            retry=Retry(attempts=3, backoff="fixed", initial=5.0, jitter=False),
        )

    run = drafting.run(input={"topic": "tides"})
    h.drain()
    state = run.state()
    assert state.status == "suspended" and state.wake_kind == "retry"
    [failure] = state.step_errors
    assert failure.type == "crux_workers.errors.ModelHTTPError"
    assert failure.details["attempt"] == 1
    h.tick(6)
    outcome = run.outcome()
    assert outcome is not None and outcome.status == "completed"
    assert outcome.result == "A draft about tides"
    assert [r.body["messages"][-1]["content"] for r in server.received] == ["Write about tides"] * 2
    assert [s.attempts for s in run.state().steps] == [2]


def test_a_rejected_request_fails_the_flow_without_retrying(h: Harness, server: ChatServer) -> None:
    server.replies.append(Reply(status=400, body=error_body("unknown model")))
    model = provider(server)

    @h.app.flow("rejected", input=Topic)
    def rejected(f: Any) -> Any:
        return f.step(
            "draft",
            lambda: generate("Write about {topic}", model=model, input=f.input),
            retry=Retry(attempts=3, backoff="fixed", initial=1.0, jitter=False),
        )

    run = rejected.run(input={"topic": "tides"})
    h.drain()
    state = run.state()
    assert state.status == "failed"
    assert state.error is not None and state.error.type.endswith("ModelRequestRejected")
    assert "unknown model" in state.error.message
    assert len(server.received) == 1


def test_an_async_step_retries_generate_async_and_the_flow_completes(
    h: Harness, server: ChatServer
) -> None:
    server.replies += [Reply(status=429, body=error_body("slow down")), Reply(text="Tides, async")]
    model = provider(server)

    @h.app.flow("drafting-async", input=Topic)
    async def drafting(f: Any) -> Any:
        return await f.step(
            "draft",
            lambda: generate_async("Write about {topic}", model=model, input=f.input),
            retry=Retry(attempts=3, backoff="fixed", initial=5.0, jitter=False),
        )

    run = drafting.run(input={"topic": "tides"})
    h.drain()
    state = run.state()
    assert state.status == "suspended" and state.wake_kind == "retry"
    [failure] = state.step_errors
    assert failure.type == "crux_workers.errors.ModelHTTPError"
    h.tick(6)
    outcome = run.outcome()
    assert outcome is not None and outcome.status == "completed", run.state().error
    assert outcome.result == "Tides, async"
    assert len(server.received) == 2
