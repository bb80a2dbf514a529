"""The public entry point: :class:`Pipeline` runs load -> FER -> reasoning -> fuse for each image."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import cem
from cem.config import Config
from cem.fuse import downweight_contradicted, ground_cues, pool
from cem.io import ImageInput, ImageLoadError, load_image
from cem.schema import FaceResult, ImageResult, Provenance


def _describe(image: ImageInput) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, np.ndarray):
        return f"<array {image.shape[1] if image.ndim > 1 else '?'}x{image.shape[0]}>"
    return f"<{type(image).__name__}>"


class Pipeline:
    """Faces, action units and blended emotions for images, with the configured reasoner.

    Build one with :meth:`from_config` and reuse it: the models load once, here, and serve every call.

    Example:
        ```python
        pipe = cem.Pipeline.from_config("default")
        result = pipe.analyze("photo.jpg", context="at a funeral")
        face = result.faces[0]
        print(face.top_emotion, face.emotion, result.to_dict())
        ```
    """

    def __init__(self, config: Config) -> None:
        from cem.fer.stage import FERStage
        from cem.reasoning import make_reasoner

        self.config = config
        self.reasoner = make_reasoner(config)  # first: a bad backend fails before models load
        self.fer = FERStage(config)

    @classmethod
    def from_config(cls, name_or_path: str | Path = "default", **overrides: Any) -> Pipeline:
        """Load a config by shipped name (``configs/NAME.yaml``) or path, apply overrides, build the models.

        Overrides: ``reasoner``, ``model``, ``template``, ``faces`` (detect|whole), ``device``, or any
        ``section__field`` (see :mod:`cem.config`).
        """
        return cls(Config.load(name_or_path, **overrides))

    def _provenance(self, timings: dict[str, float]) -> Provenance:
        sampling = None
        if getattr(self.reasoner, "do_sample", False):
            sampling = {"do_sample": True, "seed": getattr(self.reasoner, "seed", None)}
        return Provenance(cem_version=cem.__version__, config=self.config.name, reasoner=self.reasoner.backend,
                          model=self.reasoner.model_id, template=self.reasoner.template_id, timings_ms=timings,
                          sampling=sampling)

    def _measure(self, image: ImageInput, faces: str | None) -> tuple[Any, ...]:
        """Load and FER-measure one image: (name, rgb, evidence, timings, error)."""
        name = _describe(image)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            rgb = load_image(image, self.config.image.max_pixels)
        except ImageLoadError as e:
            return name, None, [], timings, str(e)
        timings["load"] = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        try:
            evidence = self.fer.measure(rgb, faces)
        except Exception as e:  # a model failure on one image must not end a batch; it is reported
            return name, rgb, [], timings, f"{name}: FER stage failed ({type(e).__name__}: {e})"
        timings["fer"] = (time.perf_counter() - t1) * 1000
        timings.update(self.fer.last_timings)
        return name, rgb, evidence, timings, None

    def _finish(self, name: str, rgb: np.ndarray | None, evidence: list, timings: dict[str, float],
                error: str | None, answers: list | None, reason_error: str | None) -> ImageResult:
        if error is not None or rgb is None:
            h, w = (rgb.shape[:2] if rgb is not None else (None, None))
            return ImageResult(name, w, h, [], self._provenance(timings), error=error)
        by_index = {a.index: a for a in answers or []}
        t = time.perf_counter()
        results = []
        for ev in evidence:
            a = by_index.get(ev.index)
            err = reason_error or (a.error if a else "reasoner returned no answer for this face")
            dist = a.distribution if a else None
            cues = ground_cues(a.cues, ev) if a else []
            if dist is not None:
                dist = downweight_contradicted(dist, cues, self.config.fusion.contradicted_penalty)
            # with no reasoner distribution the emotion is the expression model's, and `error` says so
            emotion = pool(ev.expression, dist, self.config.labels, self.config.fusion)
            results.append(FaceResult(evidence=ev, emotion=emotion, cues=cues,
                                      rationale=a.rationale if a else "", error=err if dist is None else None))
        timings["fuse"] = (time.perf_counter() - t) * 1000
        timings["total"] = sum(v for k, v in timings.items() if k in ("load", "fer", "reason", "fuse"))
        h, w = rgb.shape[:2]
        return ImageResult(name, w, h, results, self._provenance(timings))

    def _reason(self, batch: list[tuple[Any, ...]], contexts: list[str | None]) -> list[tuple[list, str | None]]:
        """Reason over several measured images at once (one model batch where the backend batches)."""
        from cem.reasoning.llm import Job

        out: list[tuple[list, str | None]] = [([], None) for _ in batch]
        live = [i for i, m in enumerate(batch) if m[4] is None and m[2]]
        if not live:
            return out
        t = time.perf_counter()
        try:
            if hasattr(self.reasoner, "reason_batch"):
                answers = self.reasoner.reason_batch([Job(batch[i][1], batch[i][2], contexts[i]) for i in live])
            else:
                answers = [self.reasoner.reason(batch[i][1], batch[i][2], contexts[i]) for i in live]
            for i, a in zip(live, answers):
                out[i] = (a, None)
        except Exception as e:  # reported on every face of these images; the run goes on
            for i in live:
                out[i] = ([], f"reasoner failed ({type(e).__name__}: {e})")
        elapsed = (time.perf_counter() - t) * 1000
        stats = dict(getattr(self.reasoner, "last_stats", {}) or {})
        for i in live:
            tm = batch[i][3]
            tm["reason"] = elapsed / len(live)
            if "model_ms" in stats:
                tm["reason_model"] = stats["model_ms"] / len(live)
                tm["reason_overhead"] = max(0.0, tm["reason"] - tm["reason_model"])
            for k in ("prompt_tokens", "generated_tokens"):
                if k in stats:
                    tm[k] = stats[k] / len(live)
        return out

    def analyze(self, image: ImageInput, context: str | None = None, faces: str | None = None) -> ImageResult:
        """Analyse one image (path, PIL image or RGB array). Never raises for a bad image: the result then
        carries ``error`` and no faces."""
        m = self._measure(image, faces)
        (answers, reason_error), = self._reason([m], [context])
        return self._finish(*m, answers, reason_error)

    def analyze_many(self, images: Iterable[ImageInput],
                     contexts: Sequence[str | None] | Mapping[str, str] | None = None,
                     faces: str | None = None, batch_size: int | None = None) -> Iterator[ImageResult]:
        """Yield one result per image, in order. ``contexts``: a list aligned with ``images`` or a mapping
        from the image's path (as given, or its file name) to its context. Images are reasoned over in
        batches of ``batch_size`` (default: the reasoner's), so an LLM backend can share model calls."""
        size = batch_size or int(getattr(self.reasoner, "batch_size", 1) or 1)
        chunk: list[tuple[Any, ...]] = []
        chunk_ctx: list[str | None] = []

        def flush() -> Iterator[ImageResult]:
            for m, (a, err) in zip(chunk, self._reason(chunk, chunk_ctx)):
                yield self._finish(*m, a, err)
            chunk.clear()
            chunk_ctx.clear()

        for i, image in enumerate(images):
            ctx: str | None = None
            if isinstance(contexts, Mapping):
                key = _describe(image)
                ctx = contexts.get(key) or contexts.get(Path(key).name)
            elif contexts is not None:
                ctx = contexts[i]
            chunk.append(self._measure(image, faces))
            chunk_ctx.append(ctx)
            if len(chunk) >= size:
                yield from flush()
        if chunk:
            yield from flush()

    def analyze_video(self, path: str | os.PathLike, context: str | None = None, every: int | None = None,
                      fps: float | None = None, options: Any = None) -> Iterator[Any]:
        """Stream a video: yields a :class:`cem.video.VideoFrame` per processed frame (tracked, smoothed
        faces; ``moments`` holds the contract records of the key moments reasoned on that frame).

        ``every``: process every Nth frame; ``fps``: sample at that rate; ``options``: a
        :class:`cem.video.VideoOptions` for tracking, smoothing and key-moment settings.
        """
        from cem.video import VideoOptions, track_video

        opts = options or VideoOptions()
        if every is not None:
            opts.every = every
        if fps is not None:
            opts.fps = fps
        name = os.fspath(path)
        for vf in track_video(self.fer, name, self.config.labels, opts):
            keys = [f for f in vf.faces if f.key]
            if keys and opts.reason:
                timings: dict[str, float] = {}
                evidence = [f.evidence for f in keys]
                for i, ev in enumerate(evidence):
                    ev.index = i
                m = (name, vf.rgb, evidence, timings, None)
                (answers, err), = self._reason([m], [context])
                result = self._finish(*m, answers, err)
                for face, tf in zip(result.to_dict()["faces"], keys):
                    face["track_id"] = tf.track_id
                    vf.moments.append({
                        "image": name, "video": name, "frame": vf.frame, "time": round(vf.time, 4),
                        "track_id": tf.track_id, "t_start": round(tf.t_start, 4), "t_end": round(vf.time, 4),
                        "key_reason": tf.key_reason, "width": vf.width, "height": vf.height, "faces": [face],
                        "error": None, "provenance": result.provenance.to_dict()})
            vf.rgb = None  # do not hold decoded frames beyond this step
            yield vf

    def close(self) -> None:
        self.fer.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The two halves of analyze_many as public calls, for engines that run them on different workers.
    def measure(self, image: ImageInput, faces: str | None = None) -> MeasuredImage:
        """Load and FER-measure one image; never raises for a bad image (``error`` is set instead)."""
        return MeasuredImage(*self._measure(image, faces))

    def reason_many(self, measured: list[MeasuredImage], contexts: list[str | None]) -> list[ImageResult]:
        """Reason over measured images in one batch and fuse: one result per image, in order."""
        parts = [(m.name, m.rgb, m.evidence, m.timings, m.error) for m in measured]
        return [self._finish(*p, a, err) for p, (a, err) in zip(parts, self._reason(parts, list(contexts)))]


@dataclass
class MeasuredImage:
    """One image after the FER stage (picklable, so it can travel between processes or machines)."""

    name: str
    rgb: np.ndarray | None
    evidence: list[Any]
    timings: dict[str, float]
    error: str | None
