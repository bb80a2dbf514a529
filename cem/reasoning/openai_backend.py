"""The ``openai`` reasoner: any OpenAI-compatible chat-completions server (vLLM, SGLang, Ollama, ...).

Config (``reasoner.model`` and ``reasoner.options``):

- ``base_url``: precedence ``base_url_override`` (what ``--base-url`` sets) > ``$OPENAI_BASE_URL`` > the
  config's ``base_url``; ``api_key``: ``$OPENAI_API_KEY`` > the config's (none needed by most local servers;
  whitespace around it, as env files leave it, is dropped). The URL is checked when the reasoner is made
  (:func:`check_base_url`); its query (``?api-version=...``) goes with every request, and a redirect is an
  error naming where it points (it is not followed).
  :attr:`OpenAIReasoner.base_url_source` says where the URL came from (for pre-flight messages).
- ``concurrency`` (requests in flight, default 4);
- ``deadline_s`` (60; ``timeout_s`` is an alias): the deadline of one whole attempt, from connecting to the
  last byte of the reply, not per read: a server that drips one byte every few seconds is cut at the
  deadline. ``connect_timeout_s`` (5) bounds connecting. A request costs at most
  ``deadline_s x (retries + 1)`` plus the waits between attempts;
- ``retries`` (2; on timeouts, connection errors, 429 and 5xx), waiting ``backoff_s`` (1 s) doubled each time,
  or the server's ``Retry-After`` (seconds or an HTTP date) capped at ``retry_after_max_s`` (30);
- ``max_reply_bytes`` (2,000,000): a longer reply is cut there and is an error (``reply-too-large``);
- ``max_cues`` (24): an answer with more cues for a face, with a label outside the configured ones or
  with a number that is not finite or not in [0, 100] is rejected for that face (``invalid-answer``);
- ``max_tokens`` (default: 256 + 512 per face in the image, at most 2,048, which a 4k-context model's
  server accepts; a reply the server cuts at this limit is an
  ``invalid-answer`` error, never a partial distribution), ``temperature`` (0), ``seed``, ``guided`` (send
  the answer's JSON schema as ``response_format``, so vLLM/SGLang decode under it; default true),
  ``distribution`` (``verbalized`` or ``likelihood``).

``distribution: likelihood`` asks, per face, for a one-token answer with ``logprobs``/``top_logprobs`` and
spreads each returned token's probability over the labels it begins (so multi-token labels count by
their first token, the best a chat API allows); a server that returns no logprobs is an error for that
face, not a silent switch to verbalised numbers.

The image goes as a JPEG data URL. Requests run concurrently up to the limit; each image is independent,
and a failed request (after retries) is an error on that image's faces:
``reasoner failed (<cause>): <detail>`` with cause timeout, unreachable, http-<code>, reply-too-large,
invalid-answer or model-error.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import math
import os
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cem.config import Config
from cem.reasoning.answer import answer_json_schema
from cem.reasoning.base import FaceReasoning
from cem.reasoning.llm import Job, LLMReasonerBase, ReasonerFailure, options

OPENAI_MAX_CUES = 24
ANSWER_TOKENS_BASE = 256
ANSWER_TOKENS_PER_FACE = 512
# at most this by default: a server refuses (HTTP 400) a request whose prompt plus max_tokens exceeds the
# model's context (4,096 tokens for LLaVA-1.5, with about 1,200 taken by the prompt and the image)
ANSWER_TOKENS_MAX = 2048
# the pre-flight's one-token chat request: one attempt, at most this long (a cold server's first reply can
# take some seconds; the run's deadline and retries made a silent server keep `cem check` waiting minutes)
CHECK_CHAT_TIMEOUT_S = 30.0


class _Retryable(ReasonerFailure):
    """A failure worth another attempt (timeout, connection, 429, 5xx); ``wait_s`` is the server's
    Retry-After when it sent one."""

    def __init__(self, cause: str, detail: str, wait_s: float | None = None) -> None:
        super().__init__(cause, detail)
        self.wait_s = wait_s


def data_url(image: Any, max_side: int = 1024) -> str:
    from PIL import Image

    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((round(im.width * s), round(im.height * s)))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def resolve_base_url(opts: dict[str, Any]) -> tuple[str, str]:
    """(base URL, where it came from): ``--base-url`` > ``$OPENAI_BASE_URL`` > the config."""
    if opts.get("base_url_override"):
        return str(opts["base_url_override"]).rstrip("/"), "--base-url"
    if os.environ.get("OPENAI_BASE_URL"):
        return os.environ["OPENAI_BASE_URL"].rstrip("/"), "$OPENAI_BASE_URL"
    if opts.get("base_url"):
        return str(opts["base_url"]).rstrip("/"), "config (reasoner.options.base_url)"
    return "", ""


def check_base_url(base_url: str, source: str) -> urllib.parse.SplitResult:
    """``base_url`` split, or ValueError naming it (and ``source``) and what is wrong: not http(s), no host, a
    host that is no host name, a port out of range, credentials in the URL (they would be written into error
    records; a key goes in $OPENAI_API_KEY) or a fragment. A path with non-ASCII text is sent percent-encoded
    and a query (``?api-version=...``) is sent with every request."""
    where = f"openai base URL {base_url!r} (from {source})"
    url = urllib.parse.urlsplit(base_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"{where} is not an http(s) URL")
    if url.username is not None or url.password is not None:
        raise ValueError(f"openai base URL (from {source}) holds credentials (user:password@); give the URL "
                         f"without them and the key in $OPENAI_API_KEY or reasoner.options.api_key")
    if url.fragment:
        raise ValueError(f"{where} has a fragment (#...), which no server sees; leave it out")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url.path + url.query):
        raise ValueError(f"{where} has a space or a control character in its path or query; percent-encode it "
                         f"(%20)")
    try:
        url.port  # noqa: B018 - reading it checks it: "Port out of range 0-65535"
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    host = url.hostname
    try:
        if any(c.isspace() or ord(c) < 32 for c in host):
            raise UnicodeError
        host.encode("idna")
    except UnicodeError:
        raise ValueError(f"{where}: {host!r} is not a host name or address") from None
    return url


def api_key(opts: dict[str, Any]) -> str | None:
    """The API key: ``$OPENAI_API_KEY`` > ``reasoner.options.api_key``, without the surrounding whitespace that
    env files and secrets often carry (a trailing newline made every request fail with the key in the message).
    A key with other characters than printable ASCII is refused without being shown."""
    source = "$OPENAI_API_KEY" if os.environ.get("OPENAI_API_KEY", "").strip() else "reasoner.options.api_key"
    raw = os.environ.get("OPENAI_API_KEY", "").strip() or opts.get("api_key")
    if raw is None or raw == "":
        return None
    key = str(raw).strip()
    if not key:
        return None
    if not all(" " < c < "\x7f" for c in key):
        raise ValueError(f"the API key in {source} holds a character that cannot go in an HTTP header (a space, "
                         f"a control character or non-ASCII text); it is not shown here")
    return key


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _redirect(status: int, url: str, headers: dict[str, str]) -> str:
    """What a redirect says: cem does not follow them (a POST that is redirected may be replayed as a GET, and
    an http -> https proxy means the base URL itself is wrong)."""
    to = headers.get("location")
    return (f"HTTP {status} from {url}: redirected to {to[:200]!r}; give the URL it redirects to as the base URL"
            if to else f"HTTP {status} from {url}: a redirect without a Location; check the base URL")


class OpenAIReasoner(LLMReasonerBase):
    backend = "openai"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        o = options(config)
        self.base_url, self.base_url_source = resolve_base_url(o)
        if not self.base_url:
            raise ValueError("the openai reasoner needs a server URL: --base-url, $OPENAI_BASE_URL or "
                             "reasoner.options.base_url (e.g. http://127.0.0.1:8000/v1 for a local vLLM server)")
        self._url = check_base_url(self.base_url, self.base_url_source)
        self._path = urllib.parse.quote(self._url.path.rstrip("/"), safe="/%:@!$&'()*+,;=~-._")
        self.api_key = api_key(o)
        self.model_id = config.reasoner.model
        if not self.model_id:
            raise ValueError("the openai reasoner needs a model name: --model NAME or reasoner.model")
        self.concurrency = max(1, int(o.get("concurrency", 4)))
        self.batch_size = max(self.batch_size, self.concurrency)
        self.deadline = float(o.get("deadline_s", o.get("timeout_s", 60)))
        self.connect_timeout = float(o.get("connect_timeout_s", 5))
        self.retries = max(0, int(o.get("retries", 2)))
        self.backoff = float(o.get("backoff_s", 1.0))
        self.retry_after_max = float(o.get("retry_after_max_s", 30))
        self.max_reply_bytes = int(o.get("max_reply_bytes", 2_000_000))
        self.max_cues = int(o.get("max_cues", OPENAI_MAX_CUES))
        # None: sized to the faces (answer_token_budget); a set value is used as it is
        self.max_tokens = int(o["max_tokens"]) if o.get("max_tokens") is not None else None
        self.temperature = float(o.get("temperature", 0.0))
        self.seed = o.get("seed")
        self.guided = bool(o.get("guided", True))
        self.mode = o.get("distribution", "verbalized")
        if self.mode not in ("verbalized", "likelihood"):
            raise ValueError(f"reasoner.options.distribution must be verbalized or likelihood, not {self.mode!r}")
        for name, v in (("deadline_s", self.deadline), ("connect_timeout_s", self.connect_timeout)):
            if not v > 0:
                raise ValueError(f"reasoner.options.{name} must be > 0, not {v!r}")

    # ---------------------------------------------------------------------------------------- HTTP
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _attempt(self, method: str, path: str, payload: bytes | None, deadline_s: float) -> tuple[int, dict, bytes]:
        """One HTTP exchange that ends by ``deadline_s`` whatever the server does: a watchdog shuts the
        socket at the deadline, and every read is bounded by the time left. Returns (status, headers, body)."""
        url = self._url
        end = time.monotonic() + deadline_s
        conn_cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(url.hostname or "", url.port, timeout=min(self.connect_timeout, deadline_s))
        fired = threading.Event()
        held: list[socket.socket] = []  # the connection drops its socket once a reply is complete; keep it

        def cut() -> None:
            fired.set()
            for sock in held:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed: the read that was waiting has ended anyway

        watchdog = threading.Timer(deadline_s, cut)
        watchdog.daemon = True
        watchdog.start()
        where = f"{self.base_url} (from {self.base_url_source})"
        try:
            try:
                conn.connect()
            except (ConnectionError, socket.gaierror, OSError) as e:
                if isinstance(e, TimeoutError) or fired.is_set():
                    raise _Retryable("timeout", f"no connection to {where} within "
                                     f"{min(self.connect_timeout, deadline_s):g} s") from None
                raise _Retryable("unreachable", f"cannot connect to {where}: {e}") from None
            held.append(conn.sock)
            sock = conn.sock
            try:
                sock.settimeout(max(0.01, end - time.monotonic()))
                target = self._path + path + (f"?{url.query}" if url.query else "")
                try:
                    conn.request(method, target, body=payload, headers=self._headers())
                except (ValueError, UnicodeError, http.client.InvalidURL) as e:  # not sent; may hold a header: unshown
                    raise ReasonerFailure("model-error", f"the request to {where} could not be sent "
                                          f"({type(e).__name__})") from None
                resp = conn.getresponse()
                chunks, size = [], 0
                while True:
                    left = end - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    sock.settimeout(left)
                    chunk = resp.read1(65536)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self.max_reply_bytes:
                        raise ReasonerFailure("reply-too-large", f"reply from {self.base_url} exceeds "
                                              f"{self.max_reply_bytes:,} bytes (max_reply_bytes); cut there")
                    chunks.append(chunk)
                if fired.is_set():  # the watchdog ended the reply: it is cut, not complete
                    raise TimeoutError
                if resp.length:  # the connection closed before the Content-Length announced (read1 says b"")
                    raise _Retryable("unreachable", f"connection to {where} closed mid-reply, after {size:,} of "
                                     f"{size + resp.length:,} bytes")
            except TimeoutError:
                raise _Retryable("timeout", f"no complete reply from {where} within the deadline of "
                                 f"{deadline_s:g} s") from None
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                if fired.is_set():
                    raise _Retryable("timeout", f"no complete reply from {where} within the deadline of "
                                     f"{deadline_s:g} s") from None
                raise _Retryable("unreachable", f"connection to {where} failed: {type(e).__name__}: {e}") from None
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, b"".join(chunks)
        finally:
            watchdog.cancel()
            conn.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None, deadline_s: float | None = None,
                 retries: int | None = None) -> Any:
        """JSON request with retries; returns the decoded reply or raises :class:`ReasonerFailure`.
        ``deadline_s`` and ``retries``: the configured ones unless given (the pre-flight's one attempt)."""
        payload = json.dumps(body).encode() if body is not None else None
        deadline = self.deadline if deadline_s is None else deadline_s
        retries = self.retries if retries is None else retries
        last: ReasonerFailure | None = None
        for attempt in range(retries + 1):
            wait = self.backoff * (2**attempt)
            try:
                status, headers, data = self._attempt(method, path, payload, deadline)
                if status == 429 or status >= 500:
                    ra = _retry_after(headers.get("retry-after"))
                    raise _Retryable(f"http-{status}", f"HTTP {status} from {self.base_url}: "
                                     f"{data[:200].decode('utf-8', 'replace')!r}", ra)
                if status >= 400:
                    raise ReasonerFailure(f"http-{status}", f"HTTP {status} from {self.base_url}: "
                                          f"{data[:200].decode('utf-8', 'replace')!r}")
                if status >= 300:
                    raise ReasonerFailure(f"http-{status}", _redirect(status, self.base_url, headers))
                text = data.decode("utf-8", errors="replace")
                try:
                    return json.loads(text)
                except (ValueError, RecursionError):  # ValueError: also an integer beyond Python's 4,300 digits
                    raise ReasonerFailure("invalid-answer", f"server reply is not JSON: {text[:80]!r}") from None
            except _Retryable as e:
                last = e
                if e.wait_s is not None:
                    wait = min(e.wait_s, self.retry_after_max)
            if attempt < retries:
                time.sleep(wait)
        assert last is not None
        tries = f" (after {retries + 1} attempts)" if retries else ""
        raise ReasonerFailure(last.cause, last.detail + tries)

    def _post(self, body: dict[str, Any], deadline_s: float | None = None,
              retries: int | None = None) -> dict[str, Any]:
        reply = self._request("POST", "/chat/completions", body, deadline_s, retries)
        if not isinstance(reply, dict):
            raise ReasonerFailure("invalid-answer", f"server reply is not a JSON object: {str(reply)[:80]!r}")
        return reply

    def check_chat(self, timeout_s: float | None = None) -> str:
        """Pre-flight: one chat request for one token, one attempt within ``timeout_s`` (default
        :data:`CHECK_CHAT_TIMEOUT_S`; not the run's deadline
        and retries: a server that never answers kept ``cem check`` silent for 6 minutes). Returns the reply's
        text; a reply without any (``{}``, no choices, a tool call with null content) is a ReasonerFailure,
        as every answer of a run would be. The token limit cuts it, so ``finish_reason: length`` is expected."""
        body = {"model": self.model_id, "max_tokens": 1, "messages": [{"role": "user", "content": "Say OK."}]}
        deadline = min(self.deadline, CHECK_CHAT_TIMEOUT_S if timeout_s is None else timeout_s)
        reply = self._post(body, deadline_s=deadline, retries=0)
        choices = reply.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            reply = {**reply, "choices": [{**choices[0], "finish_reason": None}]}
        return self._content(reply)

    def check_server(self, timeout_s: float = 3.0) -> list[str]:
        """Pre-flight: ``GET /models`` within ``timeout_s``. Returns the model names the server lists."""
        status, headers, data = self._attempt("GET", "/models", None, timeout_s)
        if status >= 400:
            raise ReasonerFailure(f"http-{status}", f"GET {self.base_url}/models answered HTTP {status}")
        if status >= 300:
            raise ReasonerFailure(f"http-{status}", _redirect(status, f"{self.base_url}/models", headers))
        try:
            listed = json.loads(data.decode("utf-8", "replace")).get("data") or []
        except (ValueError, AttributeError, RecursionError):
            return []
        return [str(m.get("id")) for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []

    def _messages(self, job: Job, text: str) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(im)}}
                                         for im in job.built_prompt.images]
        content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    def answer_tokens(self, n_faces: int) -> int:
        """``max_tokens`` of a request about ``n_faces`` faces: the configured value, or else
        ``ANSWER_TOKENS_BASE + ANSWER_TOKENS_PER_FACE`` per face, at most ``ANSWER_TOKENS_MAX`` (a face's
        distribution, a few cues and a rationale take about 150-400 tokens; a reply cut at the limit is an
        error, not a partial answer: a group photo may need a larger, configured value)."""
        return self.max_tokens or min(ANSWER_TOKENS_MAX, ANSWER_TOKENS_BASE + ANSWER_TOKENS_PER_FACE * max(1, n_faces))

    def request_body(self, job: Job) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model_id, "messages": self._messages(job, job.built_prompt.text),
                                "max_tokens": self.answer_tokens(len(job.faces)), "temperature": self.temperature}
        if self.seed is not None:
            body["seed"] = int(self.seed)
        if self.guided:
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": "cem_answer", "strict": True,
                "schema": answer_json_schema(self.labels, len(job.faces), self.max_cues, self.max_text)}}
        return body

    def _likelihood(self, job: Job) -> dict[int, dict[str, float]]:
        out = {}
        for i in range(len(job.faces)):
            q = (job.built_prompt.text + f"\nFor face {i + 1} only: answer with one word, the most fitting of "
                 f"{', '.join(self.labels)}.")
            body = {"model": self.model_id, "messages": self._messages(job, q), "max_tokens": 1,
                    "temperature": 0.0, "logprobs": True, "top_logprobs": 20}
            reply = self._post(body)
            try:
                tops = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            except (KeyError, IndexError, TypeError):
                raise ReasonerFailure("invalid-answer", "the server returned no logprobs; use distribution: "
                                      "verbalized") from None
            if not isinstance(tops, list) or not all(isinstance(t, dict) for t in tops):
                raise ReasonerFailure("invalid-answer", "top_logprobs is not a list of {token, logprob} objects")
            mass = dict.fromkeys(self.labels, 0.0)
            for t in tops:
                tok = str(t.get("token", "")).strip().lower()
                owners = [lab for lab in self.labels if tok and lab.startswith(tok)]
                for lab in owners:
                    try:
                        lp = float(t["logprob"])
                    except (KeyError, TypeError, ValueError):
                        raise ReasonerFailure("invalid-answer", f"logprob {t.get('logprob')!r} is not a "
                                              "number") from None
                    if not (math.isfinite(lp) or lp == float("-inf")) or lp > 1e-6:
                        raise ReasonerFailure("invalid-answer", f"logprob {t['logprob']!r} is not a number <= 0")
                    mass[lab] += math.exp(min(lp, 0.0)) / len(owners)
            total = sum(mass.values())
            if total <= 0:
                raise ReasonerFailure("invalid-answer", f"no label among the top tokens for face {i + 1}")
            out[i] = {k: v / total for k, v in mass.items()}
        return out

    @staticmethod
    def _content(reply: dict[str, Any], max_tokens: int | None = None) -> str:
        """The answer text of a reply; a reply the server cut at ``max_tokens`` is an error (its missing
        labels may be the model's real answer), as is one without text."""
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ReasonerFailure("invalid-answer", "server reply has no choices[0].message.content") from None
        if isinstance(text, list):  # content as a list of parts: [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") for p in text if isinstance(p, dict) and p.get("type") == "text"]
            text = "".join(p for p in parts if isinstance(p, str)) if parts else text
        if not isinstance(text, str):
            raise ReasonerFailure("invalid-answer", f"message content is {type(text).__name__}, not text")
        if isinstance(choice, dict) and choice.get("finish_reason") == "length":
            raise ReasonerFailure("invalid-answer", f"the server cut the answer at max_tokens ({max_tokens}) "
                                  "before it was complete; raise reasoner.options.max_tokens")
        return text.lstrip("\ufeff")

    def _one(self, job: Job) -> list[FaceReasoning]:
        try:
            body = self.request_body(job)
            text = self._content(self._post(body), body["max_tokens"])
        except ReasonerFailure as e:
            return self.to_results(job, None, None, transport_error=str(e))[0]
        like = None
        like_err = None
        if self.mode == "likelihood":
            try:
                like = self._likelihood(job)
            except ReasonerFailure as e:
                like_err = str(e)
            except Exception as e:  # a malformed reply for this image is this image's error only
                like_err = str(ReasonerFailure("invalid-answer", f"likelihood: {type(e).__name__}: {e}"))
        res, err = self.to_results(job, text, like, strict=True)
        if err and any(r.distribution is None for r in res):  # retry once with the parser's complaint
            retry = dict(self.request_body(job))
            retry["messages"] = self._messages(job, job.built_prompt.text + f"\nYour previous answer was invalid "
                                               f"({err}). Answer again with JSON only.")
            try:
                res, err = self.to_results(job, self._content(self._post(retry), retry["max_tokens"]), like,
                                           strict=True)
            except ReasonerFailure as e:
                res, _ = self.to_results(job, None, None, transport_error=str(e))
        if like_err:
            for r in res:
                r.error = like_err
                r.distribution = None
        return res

    def reason_batch(self, jobs: list[Job]) -> list[list[FaceReasoning]]:
        prompt_errors: dict[int, str] = {}
        for k, j in enumerate(jobs):
            if j.faces:
                try:
                    j.prompt = self.build_prompt(j)
                except ReasonerFailure as e:  # this image's template failure: its faces' error
                    prompt_errors[k] = str(e)

        def one(k: int, j: Job) -> list[FaceReasoning]:
            if not j.faces:
                return []
            if k in prompt_errors:
                return self.to_results(j, None, None, transport_error=prompt_errors[k])[0]
            return self._one(j)

        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(pool.map(one, range(len(jobs)), jobs))
        self.last_stats = {"model_ms": (time.perf_counter() - t) * 1000}
        return results
