"""The public entry point: :class:`Pipeline` runs load -> FER -> reasoning -> fuse for each image."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import cem
from cem.config import Config
from cem.fuse import ground_cues, pool
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

    >>> pipe = cem.Pipeline.from_config("default")          # doctest: +SKIP
    >>> result = pipe.analyze("photo.jpg", context="at a funeral")
    >>> result.faces[0].top_emotion, result.to_dict()["faces"][0]["emotion"]
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
        return Provenance(cem_version=cem.__version__, config=self.config.name, reasoner=self.reasoner.backend,
                          model=self.reasoner.model_id, template=self.reasoner.template_id, timings_ms=timings)

    def analyze(self, image: ImageInput, context: str | None = None, faces: str | None = None) -> ImageResult:
        """Analyse one image (path, PIL image or RGB array). Never raises for a bad image: the result then
        carries ``error`` and no faces."""
        name = _describe(image)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            rgb = load_image(image, self.config.image.max_pixels)
        except ImageLoadError as e:
            return ImageResult(name, None, None, [], self._provenance(timings), error=str(e))
        timings["load"] = (time.perf_counter() - t0) * 1000
        h, w = rgb.shape[:2]
        t1 = time.perf_counter()
        try:
            evidence = self.fer.measure(rgb, faces)
        except Exception as e:  # a model failure on one image must not end a batch; it is reported
            return ImageResult(name, w, h, [], self._provenance(timings),
                               error=f"{name}: FER stage failed ({type(e).__name__}: {e})")
        timings["fer"] = (time.perf_counter() - t1) * 1000
        t2 = time.perf_counter()
        try:
            answers = {a.index: a for a in self.reasoner.reason(rgb, evidence, context)}
            reason_error = None
        except Exception as e:
            answers, reason_error = {}, f"reasoner failed ({type(e).__name__}: {e})"
        timings["reason"] = (time.perf_counter() - t2) * 1000
        results = []
        for ev in evidence:
            a = answers.get(ev.index)
            err = reason_error or (a.error if a else "reasoner returned no answer for this face")
            dist = a.distribution if a else None
            # with no reasoner distribution the emotion is the expression model's, and `error` says so
            emotion = pool(ev.expression, dist, self.config.labels, self.config.fusion)
            cues = ground_cues(a.cues, ev) if a else []
            results.append(FaceResult(evidence=ev, emotion=emotion, cues=cues,
                                      rationale=a.rationale if a else "", error=err if dist is None else None))
        timings["total"] = (time.perf_counter() - t0) * 1000
        return ImageResult(name, w, h, results, self._provenance(timings))

    def analyze_many(self, images: Iterable[ImageInput],
                     contexts: Sequence[str | None] | Mapping[str, str] | None = None,
                     faces: str | None = None) -> Iterator[ImageResult]:
        """Yield one result per image, in order. ``contexts``: a list aligned with ``images`` or a mapping
        from the image's path (as given, or its file name) to its context."""
        for i, image in enumerate(images):
            ctx: str | None = None
            if isinstance(contexts, Mapping):
                key = _describe(image)
                ctx = contexts.get(key) or contexts.get(Path(key).name)
            elif contexts is not None:
                ctx = contexts[i]
            yield self.analyze(image, ctx, faces)

    def close(self) -> None:
        self.fer.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
