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
    """Chat completions with scripted behaviour: ok | error500-once | slow | notjson | badanswer."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.mode = "ok"
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.failures_left = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
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
                    else:
                        payload = json.dumps(server.reply(body)).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
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
        n = body["response_format"]["json_schema"]["schema"]["properties"]["faces"]["maxItems"]
        if self.mode == "badanswer":
            content = "I cannot tell."
        else:
            faces = [{"index": i + 1, "distribution": {"happiness": 0.7, "neutral": 0.3},
                      "cues": [{"cue": "broad smile", "source": "face", "au": None, "supports": "happiness",
                                "weight": 0.8},
                               {"cue": "furrowed brow", "source": "face", "au": None, "supports": "anger",
                                "weight": 0.4}],
                      "rationale": "Smiling at a launch."} for i in range(n)]
            content = "Here you go:\n```json\n" + json.dumps({"faces": faces}) + "\n```"
        return {"choices": [{"message": {"role": "assistant", "content": content}}]}

    def close(self) -> None:
        self.httpd.shutdown()


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
    assert r.error is None and "TransientError" in f.error and "timed out" in f.error.lower()
    assert abs(sum(f.emotion.values()) - 1) < 1e-6  # the expression model's distribution, with the error


def test_non_json_reply_is_an_error_record(server, astronaut):
    server.mode = "notjson"
    f = _pipe(server, retries=0).analyze(astronaut).faces[0]
    assert "not JSON" in f.error


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


def test_missing_base_url_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="OPENAI_BASE_URL"):
        cem.Pipeline.from_config("default", reasoner="openai", model="m")
