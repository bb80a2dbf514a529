"""The openai reasoner against a small chat-completions server on 127.0.0.1, started by the test."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import cem

LABELS = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt"]


class FakeServer:
    """Chat completions with scripted behaviour: ok | error500 | slow | notjson | badanswer | drip (one byte
    every 0.5 s) | blackhole (accepts, never answers) | retryafter (429 with Retry-After, then ok) | huge
    (a 50 MB reply) | redirect (307 to another host, as an http -> https proxy does) | answer (``self.answer``
    as the message content). Every loop is bounded and ends when
    the test closes the server."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.mode = "ok"
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.failures_left = 0
        self.answer = ""
        self.finish_reason: str | None = None
        self.fail_answers = False  # 503 to every request for an answer (a server overloaded by real requests)
        self.stop = threading.Event()
        self.times: list[float] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def _redirect(self) -> bool:
                if server.mode != "redirect":
                    return False
                self.send_response(307)
                self.send_header("Location", "https://elsewhere.invalid/v1" + self.path[3:])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return True

            def do_GET(self):
                if self._redirect():
                    return
                payload = json.dumps({"data": [{"id": "test-model"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.times.append(time.monotonic())
                if self._redirect():
                    return
                if server.fail_answers and "response_format" in body:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if server.mode == "blackhole":
                    server.stop.wait(20)  # never answers (until the test ends)
                    return
                if server.mode == "drip":
                    self.send_response(200)
                    self.end_headers()
                    for _ in range(60):  # one byte every 0.5 s: 30 s at most
                        if server.stop.wait(0.5):
                            return
                        try:
                            self.wfile.write(b" ")
                            self.wfile.flush()
                        except OSError:
                            return
                    return
                if server.mode == "huge":
                    self.send_response(200)
                    self.end_headers()
                    block = b"x" * 1_000_000
                    try:
                        for _ in range(50):
                            self.wfile.write(block)
                    except OSError:
                        pass
                    return
                if server.mode == "retryafter":
                    with server.lock:
                        fail = server.failures_left > 0
                        server.failures_left -= 1 if fail else 0
                    if fail:
                        self.send_response(429)
                        self.send_header("Retry-After", "1")
                        self.end_headers()
                        return
                with server.lock:
                    server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(0.15)
                    if server.mode == "slow":
                        time.sleep(2.0)
                    with server.lock:
                        fail = server.failures_left > 0
                        server.failures_left -= 1 if fail else 0
                    if server.mode == "error500" and fail:
                        self.send_response(500)
                        self.end_headers()
                        self.wfile.write(b"boom")
                        return
                    if server.mode == "notjson":
                        payload = b"<html>gateway error</html>"
                    elif server.mode == "bigint":  # valid JSON, but an integer of 5,000 digits in a field
                        payload = json.dumps(server.reply(body))[:-1].encode() + b', "usage": {"n": ' + \
                            b"9" * 5000 + b"}}"
                    else:
                        payload = json.dumps(server.reply(body)).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    if server.mode == "truncated" and fail:  # the connection closes half-way (a proxy reset)
                        self.send_header("Content-Length", str(len(payload)))
                        self.send_header("Connection", "close")
                        self.end_headers()
                        self.wfile.write(payload[: len(payload) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.end_headers()
                    self.wfile.write(payload)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reply(self, body: dict) -> dict:
        if body.get("logprobs"):
            tops = [{"token": "happ", "logprob": -0.2}, {"token": "neutral", "logprob": -2.0},
                    {"token": "xyz", "logprob": -3.0}]
            return {"choices": [{"message": {"content": "happiness"},
                                 "logprobs": {"content": [{"token": "happ", "logprob": -0.2, "top_logprobs": tops}]}}]}
        if "response_format" not in body:  # the pre-flight's one-token request
            if self.mode == "hollow":  # a reply that can never hold an answer
                return {"choices": []}
            return {"choices": [{"message": {"role": "assistant", "content": "O"}, "finish_reason": "length"}]}
        n = body["response_format"]["json_schema"]["schema"]["properties"]["faces"]["maxItems"]
        if self.mode == "badanswer":
            content = "I cannot tell."
        elif self.mode == "answer":
            content = self.answer
        else:
            faces = [{"index": i + 1, "distribution": {"happiness": 0.7, "neutral": 0.3},
                      "cues": [{"cue": "broad smile", "source": "face", "au": None, "supports": "happiness",
                                "weight": 0.8},
                               {"cue": "furrowed brow", "source": "face", "au": None, "supports": "anger",
                                "weight": 0.4}],
                      "rationale": "Smiling at a launch."} for i in range(n)]
            content = "Here you go:\n```json\n" + json.dumps({"faces": faces}) + "\n```"
        choice = {"message": {"role": "assistant", "content": content}}
        if self.finish_reason:
            choice["finish_reason"] = self.finish_reason
        return {"choices": [choice]}

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def server():
    s = FakeServer()
    yield s
    s.close()


def _pipe(server, **opts):
    options = {"base_url": server.url, "api_key": "k", "concurrency": 2, "timeout_s": 1.0, "retries": 1,
               "backoff_s": 0.05} | opts
    return cem.Pipeline.from_config("vllm", model="test-model", reasoner__options=options)


def test_request_has_image_schema_and_auth(server, astronaut):
    r = _pipe(server).analyze(astronaut, context="at a launch")
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k"
    body = req["body"]
    parts = body["messages"][0]["content"]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert "at a launch" in parts[-1]["text"]
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["faces"]["minItems"] == 1 and body["model"] == "test-model"
    face = r.faces[0]
    assert face.error is None and face.top_emotion == "happiness"
    grounding = {c.cue: c.grounding for c in face.cues}
    assert grounding == {"broad smile": "supported", "furrowed brow": "contradicted"}


def test_concurrency_limit_is_honoured(server, astronaut):
    results = list(_pipe(server, concurrency=2).analyze_many([astronaut] * 6))
    assert len(server.requests) == 6 and all(r.faces[0].error is None for r in results)
    assert server.max_in_flight == 2


def test_500_is_retried(server, astronaut):
    server.mode, server.failures_left = "error500", 1
    r = _pipe(server).analyze(astronaut)
    assert len(server.requests) == 2 and r.faces[0].error is None


def test_timeout_becomes_a_face_error_and_the_run_goes_on(server, astronaut):
    server.mode = "slow"
    r = _pipe(server, timeout_s=0.5, retries=0).analyze(astronaut)
    f = r.faces[0]
    assert r.error is None and f.error.startswith("reasoner failed (timeout): ")
    assert abs(sum(f.emotion.values()) - 1) < 1e-6  # the expression model's distribution, with the error


def test_a_reply_cut_mid_way_is_a_connection_failure_and_retried(server, astronaut):
    """A connection closed before the announced Content-Length was read as a complete body ("server reply is
    not JSON", invalid-answer) and never retried, though connection errors are."""
    server.mode, server.failures_left = "truncated", 1
    r = _pipe(server).analyze(astronaut)
    assert len(server.requests) == 2 and r.faces[0].error is None
    server.failures_left = 1
    f = _pipe(server, retries=0).analyze(astronaut).faces[0]
    assert f.error.startswith("reasoner failed (unreachable): ") and "closed mid-reply, after " in f.error


def test_a_reply_with_a_huge_integer_is_that_image_s_invalid_answer(server, astronaut):
    """A 5,000-digit integer (beyond Python's int conversion limit) in a field cem never reads escaped as a
    bare ValueError: a model-error, and every image of the batch asked again."""
    server.mode = "bigint"
    results = list(_pipe(server, retries=0).analyze_many([astronaut] * 2))
    assert len(server.requests) == 2  # one per image: the batch is not asked again one by one
    for r in results:
        assert r.faces[0].error.startswith("reasoner failed (invalid-answer): server reply is not JSON")


def test_non_json_reply_is_an_error_record(server, astronaut):
    server.mode = "notjson"
    f = _pipe(server, retries=0).analyze(astronaut).faces[0]
    assert f.error.startswith("reasoner failed (invalid-answer): ") and "not JSON" in f.error


def test_unparseable_answer_is_retried_once_then_reported(server, astronaut):
    server.mode = "badanswer"
    f = _pipe(server).analyze(astronaut).faces[0]
    assert len(server.requests) == 2 and "no JSON found" in f.error


def test_likelihood_mode_uses_logprobs(server, astronaut):
    import math

    from cem.reasoning.llm import Job

    pipe = _pipe(server, distribution="likelihood")
    f = pipe.analyze(astronaut).faces[0]
    assert f.error is None
    req = [r for r in server.requests if r["body"].get("logprobs")]
    assert len(req) == 1 and req[0]["body"]["top_logprobs"] == 20 and req[0]["body"]["max_tokens"] == 1
    job = Job(astronaut, pipe.fer.measure(astronaut), None)
    job.prompt = pipe.reasoner.build_prompt(job)
    dist = pipe.reasoner._likelihood(job)[0]
    p_h, p_n = math.exp(-0.2), math.exp(-2.0)  # "xyz" begins no label and is ignored
    assert dist["happiness"] == pytest.approx(p_h / (p_h + p_n)) and dist["neutral"] == pytest.approx(p_n / (p_h + p_n))
    assert dist["surprise"] == 0.0


def test_missing_base_url_is_a_clear_error_pipe(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="OPENAI_BASE_URL"):
        cem.Pipeline.from_config("default", reasoner="openai", model="m")


# ------------------------------------------------------------------------------------ robustness

def _faces_job(pipe, image, n=None):
    from cem.reasoning.llm import Job

    faces = pipe.fer.measure(image)
    return Job(image, faces[:n] if n else faces, None)


@pytest.fixture(scope="module")
def evidence(pipeline, astronaut):
    return pipeline.fer.measure(astronaut)


def _reasoner(server, **opts):
    from cem.config import Config
    from cem.reasoning.openai_backend import OpenAIReasoner

    options = {"base_url": server.url, "concurrency": 2, "deadline_s": 1.0, "retries": 1, "backoff_s": 0.05} | opts
    return OpenAIReasoner(Config.load("vllm", model="test-model", reasoner__options=options))


def _run(reasoner, image, evidence, n=1):
    from cem.reasoning.llm import Job

    return reasoner.reason_batch([Job(image, list(evidence), None) for _ in range(n)])


def test_n_requests_in_flight_with_concurrency_n(server, astronaut, evidence):
    out = _run(_reasoner(server, concurrency=4), astronaut, evidence, n=8)
    assert len(server.requests) == 8 and all(r[0].error is None for r in out)
    assert server.max_in_flight == 4


@pytest.mark.parametrize("mode", ["drip", "blackhole"])
def test_slow_drip_and_black_hole_cost_at_most_deadline_times_attempts(server, astronaut, evidence, mode):
    """A server that sends one byte every 0.5 s (each read succeeds) or never answers is cut at the
    deadline of the whole attempt: a batch of 4 images costs at most deadline x (retries + 1) (+ waits)."""
    server.mode = mode
    reasoner = _reasoner(server, concurrency=4, deadline_s=1.0, retries=1, backoff_s=0.05)
    t = time.monotonic()
    out = _run(reasoner, astronaut, evidence, n=4)
    elapsed = time.monotonic() - t
    assert elapsed < 1.0 * 2 + 0.05 + 1.0  # 2 attempts of 1 s, one backoff, 1 s of slack for a busy machine
    assert len(server.times) == 8  # every image tried twice
    for faces in out:
        assert faces[0].distribution is None and faces[0].error.startswith("reasoner failed (timeout): ")


def test_unreachable_server_is_a_clear_error(astronaut, evidence):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now

    class Dead:
        url = f"http://127.0.0.1:{port}/v1"

    out = _run(_reasoner(Dead, retries=0), astronaut, evidence)
    assert out[0][0].error.startswith("reasoner failed (unreachable): ") and str(port) in out[0][0].error


def test_retry_after_is_honoured_within_the_cap(server, astronaut, evidence):
    server.mode, server.failures_left = "retryafter", 1
    out = _run(_reasoner(server, retries=1, backoff_s=0.01, deadline_s=5), astronaut, evidence)
    assert out[0][0].error is None and len(server.times) == 2
    assert 0.95 <= server.times[1] - server.times[0] < 2.0  # the server's 1 s, not the 0.01 s backoff
    server.times.clear()
    server.failures_left = 1
    out = _run(_reasoner(server, retries=1, backoff_s=0.01, retry_after_max_s=0.2), astronaut, evidence)
    assert out[0][0].error is None and server.times[1] - server.times[0] < 0.9  # capped at 0.2 s


def test_a_50_mb_reply_is_cut_at_the_cap(server, astronaut, evidence):
    server.mode = "huge"
    out = _run(_reasoner(server, retries=0, deadline_s=10, max_reply_bytes=100_000), astronaut, evidence)
    assert out[0][0].error.startswith("reasoner failed (reply-too-large): ") and "100,000" in out[0][0].error


def _answer(dist, cues=None, rationale="r"):
    return json.dumps({"faces": [{"index": 1, "distribution": dist, "cues": cues or [], "rationale": rationale}]})


@pytest.mark.parametrize("content, why", [
    ('{"faces":[{"index":1,"distribution":{"happiness":NaN,"neutral":0.5},"cues":[],"rationale":"r"}]}', "range"),
    ('{"faces":[{"index":1,"distribution":{"happiness":Infinity,"neutral":0.5},"cues":[],"rationale":"r"}]}',
     "range"),
    (_answer({"happiness": 1e308, "neutral": 1e308}), "range"),
    (_answer({"happiness": 0.5, "pride": 0.5}), "unknown label"),
    (_answer({"happiness": 1.0}, [{"cue": "c", "source": "face", "au": None, "supports": "happiness",
                                   "weight": 0.5}] * 100_000), "cues"),
])
def test_invalid_answers_are_rejected_for_the_face(server, astronaut, evidence, content, why):
    server.mode, server.answer = "answer", content
    out = _run(_reasoner(server, retries=0, deadline_s=10, max_reply_bytes=50_000_000), astronaut, evidence)
    f = out[0][0]
    assert f.distribution is None and f.error.startswith("reasoner failed (invalid-answer): ") and why in f.error
    assert len(server.requests) == 2  # asked once more with the complaint, then reported


def test_lone_surrogate_in_an_answer_is_written_safely(server, astronaut, evidence):
    server.mode = "answer"
    server.answer = _answer({"happiness": 0.9, "neutral": 0.1},
                            [{"cue": "caf\udce9", "source": "face", "au": None, "supports": "happiness", "weight": 1}])
    f = _run(_reasoner(server), astronaut, evidence)[0][0]
    assert f.error is None
    json.dumps(f.cues[0].cue).encode("utf-8")  # encodable: the writer cannot fail on it
    f.cues[0].cue.encode("utf-8")


def test_env_beats_config_and_the_flag_beats_env(server, monkeypatch):
    from cem.reasoning.openai_backend import resolve_base_url

    monkeypatch.setenv("OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    r = _reasoner(type("S", (), {"url": "http://127.0.0.1:9/v1"}), api_key="from-config")
    assert r.base_url == server.url and r.base_url_source == "$OPENAI_BASE_URL" and r.api_key == "from-env"
    assert resolve_base_url({"base_url": "http://a/v1", "base_url_override": "http://b/v1"}) == \
        ("http://b/v1", "--base-url")
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert resolve_base_url({"base_url": "http://a/v1/"}) == ("http://a/v1", "config (reasoner.options.base_url)")


def test_cli_uses_openai_base_url_from_the_environment(server, astronaut, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    img = tmp_path / "a.png"
    Image.fromarray(astronaut).save(img)
    out = tmp_path / "o.jsonl"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OPENAI_BASE_URL": server.url, "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-m", "cem.cli", "annotate", str(img), "-o", str(out), "--config", "vllm",
                        "--model", "test-model"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["faces"][0].get("error") is None and server.requests  # the config's URL (port 8000) was not used


def test_preflight_reaches_the_server_and_names_the_url_source(server, monkeypatch):
    import socket

    from cem.config import Config
    from cem.preflight import preflight

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    ok = preflight(Config.load("vllm", model="test-model", reasoner__options={"base_url": server.url}))
    assert ok.ok and "answers for test-model" in ok.text
    assert any(r["path"] == "/v1/chat/completions" for r in server.requests)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    s.close()
    monkeypatch.setenv("OPENAI_BASE_URL", dead)
    t = time.monotonic()
    bad = preflight(Config.load("vllm", model="test-model"))
    assert time.monotonic() - t < 10
    assert not bad.ok and f"server unreachable: cannot connect to {dead} (from $OPENAI_BASE_URL)" in bad.text
    assert bad.text.count(dead) == 1  # the address once, not twice
    assert "vllm serve" in bad.text
    assert preflight(Config.load("default")).ok


def test_preflight_refuses_a_hollow_chat_reply_and_waits_for_one_reply_only(server, monkeypatch):
    """`cem check` said ready for a server whose chat replies hold no text ({"choices": []}), and the run then
    failed on every face; against a server that never answers, it waited out the run's deadline three times
    (6 minutes with the vllm config) without a word."""
    import cem.reasoning.openai_backend as backend
    from cem.config import Config
    from cem.preflight import preflight

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    config = Config.load("vllm", model="test-model", reasoner__options={"base_url": server.url, "timeout_s": 120.0,
                                                                        "retries": 2})
    server.mode = "hollow"
    report = preflight(config)
    assert not report.ok and "failed a one-token request" in report.text
    assert "server reply has no choices[0].message.content" in report.text
    server.mode = "blackhole"
    monkeypatch.setattr(backend, "CHECK_CHAT_TIMEOUT_S", 1.0)
    t = time.monotonic()
    report = preflight(config)
    assert time.monotonic() - t < 6, "one attempt of at most CHECK_CHAT_TIMEOUT_S, not 3 x 120 s"
    assert not report.ok and "(timeout)" in report.text and "failed a one-token request" in report.text


def test_provenance_settings_follow_the_server_a_run_actually_uses(monkeypatch):
    """$OPENAI_BASE_URL beats the config's base_url, so it must change provenance.settings (it did not), and
    --base-url and $OPENAI_BASE_URL naming one server give one digest."""
    from cem.config import Config
    from cem.pipeline import Pipeline

    def settings(**env_and_override):
        override = env_and_override.pop("override", None)
        for k, v in env_and_override.items():
            monkeypatch.setenv(k, v)
        cfg = Config.load("vllm", model="test-model")
        if override:
            cfg.reasoner.options = {**cfg.reasoner.options, "base_url_override": override}
        return Pipeline(cfg, load_fer=False).provenance().settings

    a = settings(OPENAI_BASE_URL="http://box-a:8000/v1")
    b = settings(OPENAI_BASE_URL="http://box-b:8000/v1")
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert a != b and settings(override="http://box-a:8000/v1") == a


def test_an_answer_cut_at_max_tokens_is_an_error_not_a_partial_distribution(server, astronaut, evidence):
    # the server stopped at the token limit; what arrived happens to parse
    server.mode, server.finish_reason = "answer", "length"
    server.answer = _answer({"neutral": 0.4, "happiness": 0.6})
    f = _run(_reasoner(server, retries=0, max_tokens=50), astronaut, evidence)[0][0]
    assert f.distribution is None and f.error.startswith("reasoner failed (invalid-answer): ")
    assert "max_tokens (50)" in f.error
    assert server.requests[0]["body"]["max_tokens"] == 50


def test_max_tokens_grows_with_the_faces_unless_set(server, astronaut, evidence):
    from cem.reasoning.openai_backend import ANSWER_TOKENS_BASE, ANSWER_TOKENS_PER_FACE

    _run(_reasoner(server), astronaut, evidence)
    assert server.requests[0]["body"]["max_tokens"] == ANSWER_TOKENS_BASE + ANSWER_TOKENS_PER_FACE


def test_content_given_as_text_parts_is_read(server, astronaut, evidence):
    server.mode = "answer"
    server.answer = _answer({"happiness": 0.9, "neutral": 0.1})
    real = server.reply
    server.reply = lambda body: {"choices": [{"message": {"content": [
        {"type": "text", "text": real(body)["choices"][0]["message"]["content"]}]}}]}
    f = _run(_reasoner(server), astronaut, evidence)[0][0]
    assert f.error is None and f.distribution["happiness"] == pytest.approx(0.9)


def test_provenance_names_the_template_as_edited_between_runs(server, astronaut, tmp_path):
    """A notebook edits its template between runs: each record names the text its prompt was made from."""
    tpl = tmp_path / "mine.j2"
    body = "{% for f in faces %}{{ f.line }}{% endfor %} Labels: {{ labels | join(', ') }}. {{ schema_hint }}"
    tpl.write_text("First version. " + body)
    pipe = cem.Pipeline.from_config(
        "vllm", model="test-model", template=str(tpl),
        reasoner__options={"base_url": server.url, "timeout_s": 2.0, "retries": 0})
    first = pipe.analyze(astronaut).provenance.template
    tpl.write_text("Second, longer version. " + body)
    second = pipe.analyze(astronaut).provenance.template
    pipe.close()
    from cem.prompting import template_id

    assert first != second and second == template_id(str(tpl))
    assert server.requests[-1]["body"]["messages"][0]["content"][-1]["text"].startswith("Second")


def test_a_model_rationale_that_argues_for_another_label_is_not_quoted(server, astronaut):
    server.mode = "answer"
    server.answer = json.dumps({"faces": [{"index": 1, "distribution": {"happiness": 0.9, "neutral": 0.1},
                                           "cues": [], "rationale": "Clearly furious; the answer is anger."}]})
    f = _pipe(server).analyze(astronaut).faces[0]
    assert f.error is None and "furious" not in f.rationale
    assert "rationale names anger, not its answer (happiness), and is left out" in f.rationale
    server.answer = server.answer.replace("Clearly furious; the answer is anger.", "A broad, happy smile.")
    assert 'The model said: "A broad, happy smile."' in _pipe(server).analyze(astronaut).faces[0].rationale


def test_a_rejected_answer_is_neither_quoted_nor_cited(server, astronaut):
    server.mode = "answer"
    server.answer = json.dumps({"faces": [{"index": 1, "distribution": {"joy": 1.0},
                                           "cues": [{"cue": "big grin", "source": "face", "au": "AU12",
                                                     "supports": "happiness", "weight": 0.9}],
                                           "rationale": "A big grin."}]})
    f = _pipe(server, retries=0).analyze(astronaut).faces[0]
    assert f.error.startswith("reasoner failed (invalid-answer)") and "big grin" not in f.rationale.lower()
    assert f.cues == [] and "gave no answer" in f.rationale


def test_an_api_key_is_stripped_of_surrounding_whitespace_and_a_bad_one_is_refused_unshown(server, astronaut,
                                                                                          monkeypatch):
    """A key from an env file or a secret often ends in a newline: it failed every request with the key in the
    error record. Whitespace around it is dropped; a key with a control character inside is refused unshown."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret123\n")
    face = _pipe(server).analyze(astronaut).faces[0]
    assert face.error is None and server.requests[0]["auth"] == "Bearer sk-secret123"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-sec\x01ret123")
    with pytest.raises(ValueError, match=r"API key in \$OPENAI_API_KEY holds a character") as e:
        _pipe(server)
    assert "sec" not in str(e.value)


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:99999/v1", "Port out of range"),
    ("http://ex\u00e4 mple.invalid/v1", "is not a host name"),
    ("http://a..b/v1", "is not a host name"),
    ("http://user:hunter2@127.0.0.1:8000/v1", "holds credentials"),
    ("http://127.0.0.1:8000/v1#chat", "has a fragment"),
])
def test_a_base_url_that_cannot_work_is_refused_naming_it(url, why, monkeypatch):
    """These crashed `cem check` with a traceback (exit 1) and failed every image with a bare exception text."""
    from cem.config import Config
    from cem.preflight import preflight

    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    report = preflight(Config.load("vllm", model="m", reasoner__options={"base_url": url}))
    assert not report.ok and why in report.text and "reasoner.options.base_url" in report.text
    assert "hunter2" not in report.text


def test_a_base_url_path_with_other_letters_and_a_query_reach_the_server(server, astronaut, evidence):
    """A non-ASCII path is sent percent-encoded (it raised UnicodeEncodeError) and a query, as Azure-style
    gateways need (?api-version=...), goes with every request (it was dropped)."""
    port = server.url.split(":")[2].split("/")[0]
    r = _reasoner(server, base_url=f"http://127.0.0.1:{port}/v\u00e9/v1?api-version=2024-06-01")
    assert _run(r, astronaut, evidence)[0][0].error is None
    assert server.requests[0]["path"] == "/v%C3%A9/v1/chat/completions?api-version=2024-06-01"


def test_a_redirect_is_named_with_where_it_points(server, astronaut, evidence, monkeypatch):
    """A 3xx was taken for a reply and reported as "server reply is not JSON: ''"."""
    from cem.config import Config
    from cem.preflight import preflight

    server.mode = "redirect"
    face = _run(_reasoner(server, retries=0), astronaut, evidence)[0][0]
    assert "reasoner failed (http-307)" in face.error and "redirected to 'https://elsewhere.invalid/v1" in face.error
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    report = preflight(Config.load("vllm", model="test-model", reasoner__options={"base_url": server.url}))
    assert not report.ok and "redirected to 'https://elsewhere.invalid/v1/models'" in report.text
    assert "unreachable" not in report.text


def test_control_characters_in_a_model_rationale_are_dropped(server, astronaut, tmp_path):
    """A NUL in a rationale was kept in the JSONL and the CSV table, where pandas cut the text at it; a
    right-to-left override turned the text around. Model text is kept as contexts are: newlines and tabs only."""
    import pandas as pd

    from cem.results import write_table

    server.mode = "answer"
    said = "smile\x00 wide\r\n\tand \u202eraised cheeks"
    server.answer = _answer({"happiness": 0.9, "neutral": 0.1}, [
        {"cue": "broad\x07 smile", "source": "face", "au": None, "supports": "happiness", "weight": 1}], said)
    from PIL import Image

    image, out = tmp_path / "astronaut.png", tmp_path / "o.jsonl"
    Image.fromarray(astronaut).save(image)
    _pipe(server).annotate([str(image)], out, progress=False)
    face = json.loads(out.read_text())["faces"][0]
    assert 'said: "smile wide\n\tand raised cheeks"' in face["rationale"]
    assert face["cues"][0]["cue"] == "broad smile"
    write_table(out, tmp_path / "o.csv")
    assert pd.read_csv(tmp_path / "o.csv")["rationale"][0] == face["rationale"]


@pytest.mark.parametrize("context", ["\u200b", "\ufeff", "\x00\x07", " \n "])
def test_a_context_that_is_nothing_once_made_inert_is_not_recorded_as_used(server, astronaut, context):
    """The prompt said "No context was given" for these, but provenance.context_used said true."""
    r = _pipe(server).analyze(astronaut, context=context)
    assert r.provenance.context_used is False
    assert "No context was given" in server.requests[0]["body"]["messages"][0]["content"][-1]["text"]


def test_retry_errors_redoes_images_whose_reasoner_failed(server, astronaut, tmp_path):
    """A server that was down left records whose faces carry "reasoner failed (http-503)"; --resume
    --retry-errors skipped them as done, so --overwrite was the only way to get the model's answers."""
    from PIL import Image

    from cem.runner import annotate

    images = []
    for name in ("a.png", "b.png"):
        images.append(tmp_path / name)
        Image.fromarray(astronaut).save(images[-1])
    out = tmp_path / "o.jsonl"
    pipe = _pipe(server, retries=0)
    server.fail_answers = True  # it passes the pre-flight's one-token request, then fails every image
    failed = annotate(pipe, [str(p) for p in images], out, progress=False)
    assert failed.exit_code == 3 and all("reasoner failed (http-503)" in json.loads(x)["faces"][0]["error"]
                                         for x in out.read_text().splitlines())
    server.fail_answers = False  # the server is back
    assert annotate(pipe, [str(p) for p in images], out, progress=False, resume=True).skipped == 2
    again = annotate(pipe, [str(p) for p in images], out, progress=False, resume=True, retry_errors=True)
    assert again.retried == 2 and again.exit_code == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 2 and all(r["faces"][0].get("error") is None for r in recs)
    assert {r["image"] for r in recs} == {str(p) for p in images}
