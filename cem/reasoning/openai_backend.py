"""The ``openai`` reasoner: any OpenAI-compatible chat-completions server (vLLM, SGLang, Ollama, ...).

Config (``reasoner.model`` and ``reasoner.options``): ``base_url`` (else ``$OPENAI_BASE_URL``), ``api_key``
(else ``$OPENAI_API_KEY``; none needed by most local servers), ``concurrency`` (requests in flight,
default 4), ``timeout_s`` (60), ``retries`` (2, exponential backoff from ``backoff_s`` = 1 s, on timeouts,
connection errors, 429 and 5xx), ``max_tokens`` (512), ``temperature`` (0), ``seed``, ``distribution``
(``verbalized`` or ``likelihood``), ``guided`` (send the answer's JSON schema as ``response_format``, so
vLLM/SGLang decode under it; default true).

``distribution: likelihood`` asks, per face, for a one-token answer with ``logprobs``/``top_logprobs`` and
spreads each returned token's probability over the labels it begins (so multi-token labels count by
their first token, the best a chat API allows); a server that returns no logprobs is an error for that
face, not a silent switch to verbalised numbers.

The image goes as a JPEG data URL. Requests run concurrently up to the limit; each image is independent,
and a failed request (after retries) becomes an ``error`` on that image's faces.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from cem.config import Config
from cem.reasoning.answer import answer_json_schema
from cem.reasoning.base import FaceReasoning
from cem.reasoning.llm import Job, LLMReasonerBase, options


class TransientError(RuntimeError):
    """A failure worth retrying (timeout, connection, 429, 5xx)."""


def data_url(image: Any, max_side: int = 1024) -> str:
    from PIL import Image

    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((round(im.width * s), round(im.height * s)))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAIReasoner(LLMReasonerBase):
    backend = "openai"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        o = options(config)
        self.base_url = (o.get("base_url") or os.environ.get("OPENAI_BASE_URL") or "").rstrip("/")
        if not self.base_url:
            raise ValueError("the openai reasoner needs reasoner.options.base_url or $OPENAI_BASE_URL "
                             "(e.g. http://127.0.0.1:8000/v1 for a local vLLM server)")
        self.api_key = o.get("api_key") or os.environ.get("OPENAI_API_KEY")
        self.model_id = config.reasoner.model
        if not self.model_id:
            raise ValueError("the openai reasoner needs a model name: --model NAME or reasoner.model")
        self.concurrency = max(1, int(o.get("concurrency", 4)))
        self.batch_size = max(self.batch_size, self.concurrency)
        self.timeout = float(o.get("deadline_s", 60))
        self.retries = int(o.get("retries", 2))
        self.backoff = float(o.get("backoff_s", 1.0))
        self.max_tokens = int(o.get("max_tokens", 512))
        self.temperature = float(o.get("temperature", 0.0))
        self.seed = o.get("seed")
        self.guided = bool(o.get("guided", True))
        self.mode = o.get("distribution", "verbalized")
        if self.mode not in ("verbalized", "likelihood"):
            raise ValueError(f"reasoner.options.distribution must be verbalized or likelihood, not {self.mode!r}")

    # ---------------------------------------------------------------------------------------- HTTP
    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    payload = resp.read().decode("utf-8", errors="replace")
                try:
                    return json.loads(payload)
                except json.JSONDecodeError:
                    raise RuntimeError(f"server reply is not JSON: {payload[:80]!r}") from None
            except urllib.error.HTTPError as e:
                if e.code == 429 or e.code >= 500:
                    last = TransientError(f"HTTP {e.code} from {self.base_url}")
                else:
                    raise RuntimeError(f"HTTP {e.code} from {self.base_url}: {e.read()[:200]!r}") from None
            except (TimeoutError, urllib.error.URLError, ConnectionError) as e:
                last = TransientError(f"{type(e).__name__} talking to {self.base_url}: {getattr(e, 'reason', e)}")
            if attempt < self.retries:
                time.sleep(self.backoff * (2**attempt))
        raise last or RuntimeError("request failed")

    def _messages(self, job: Job, text: str) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(im)}}
                                         for im in job.prompt.images]
        content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]

    def request_body(self, job: Job) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model_id, "messages": self._messages(job, job.prompt.text),
                                "max_tokens": self.max_tokens, "temperature": self.temperature}
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
            q = (job.prompt.text + f"\nFor face {i + 1} only: answer with one word, the most fitting of "
                 f"{', '.join(self.labels)}.")
            body = {"model": self.model_id, "messages": self._messages(job, q), "max_tokens": 1,
                    "temperature": 0.0, "logprobs": True, "top_logprobs": 20}
            reply = self._post(body)
            try:
                tops = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            except (KeyError, IndexError, TypeError):
                raise RuntimeError("the server returned no logprobs; use distribution: verbalized") from None
            mass = dict.fromkeys(self.labels, 0.0)
            for t in tops:
                tok = str(t.get("token", "")).strip().lower()
                owners = [lab for lab in self.labels if tok and lab.startswith(tok)]
                for lab in owners:
                    mass[lab] += math.exp(float(t["logprob"])) / len(owners)
            total = sum(mass.values())
            if total <= 0:
                raise RuntimeError(f"no label among the top tokens for face {i + 1}")
            out[i] = {k: v / total for k, v in mass.items()}
        return out

    def _one(self, job: Job) -> list[FaceReasoning]:
        try:
            reply = self._post(self.request_body(job))
            text = reply["choices"][0]["message"]["content"]
        except Exception as e:
            res, _ = self.to_results(job, None, None, transport_error=f"{type(e).__name__}: {e}")
            return res
        like = None
        like_err = None
        if self.mode == "likelihood":
            try:
                like = self._likelihood(job)
            except Exception as e:
                like_err = f"likelihood: {e}"
        res, err = self.to_results(job, text, like)
        if err and any(r.distribution is None for r in res):  # retry once with the parser's complaint
            retry = dict(self.request_body(job))
            retry["messages"] = self._messages(job, job.prompt.text + f"\nYour previous answer was invalid ({err}). "
                                               "Answer again with JSON only.")
            try:
                res, err = self.to_results(job, self._post(retry)["choices"][0]["message"]["content"], like)
            except Exception as e:
                res, _ = self.to_results(job, None, None, transport_error=f"{type(e).__name__}: {e}")
        if like_err:
            for r in res:
                r.error = like_err
                r.distribution = None
        return res

    def reason_batch(self, jobs: list[Job]) -> list[list[FaceReasoning]]:
        for j in jobs:
            if j.faces:
                j.prompt = self.build_prompt(j)
        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(pool.map(lambda j: self._one(j) if j.faces else [], jobs))
        self.last_stats = {"model_ms": (time.perf_counter() - t) * 1000}
        return results
