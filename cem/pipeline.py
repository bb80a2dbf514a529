"""The public entry point: :class:`Pipeline` runs load -> FER -> reasoning -> fuse for each image."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
from pydantic import ValidationError

import cem
from cem.config import FACE_MODES, Config, check_faces_mode
from cem.contract import MAX_CONTEXT_CHARS, FaceEvidence, FaceResult, ImageResult, Provenance
from cem.fer.expression import model_id as expression_model_id
from cem.fuse import downweight_contradicted, explain, ground_cues, pool
from cem.io import ImageInput, ImageLoadError, load_image
from cem.signals import is_interrupt

log = logging.getLogger(__name__)


def _describe(image: ImageInput) -> str:
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        return os.fsdecode(name) if isinstance(name, bytes) else name
    if isinstance(image, np.ndarray):
        if image.ndim < 2:  # not an image; load_image says why
            return f"<array of shape {image.shape}>"
        return f"<array {image.shape[1]}x{image.shape[0]}>"
    return f"<{type(image).__name__}>"


def _check_contexts(contexts: Sequence[Any]) -> None:
    for c in contexts:
        if c is not None and not isinstance(c, str):
            raise TypeError(f"a context must be a string or None, not {type(c).__name__} ({c!r:.60})")
        if c is not None and len(c) > MAX_CONTEXT_CHARS:
            raise ValueError(f"a context has {len(c)} characters, more than the limit of {MAX_CONTEXT_CHARS} (what "
                             f"a prompt carries in full); shorten it")


_REASON_FAILED = re.compile(r"^reasoner failed \(([^)]+)\)")


def reasoner_failure_cause(error: str | None) -> str | None:
    """The cause word of a face's ``error`` when its reasoner failed ("timeout", "http-503", ...), else None."""
    if not error:
        return None
    m = _REASON_FAILED.match(error)
    if m:
        return m.group(1)
    return "other" if error.startswith("reasoner") else None


def _invalid_result(name: str, where: str, e: ValidationError) -> str:
    """The error of an image whose result the contract refuses, naming the fields (``where.<field>``)."""
    fields = [f"{where}." + ".".join(str(p) for p in err["loc"]) for err in e.errors()]
    shown = ", ".join(fields[:5]) + (f" and {len(fields) - 5} more" if len(fields) > 5 else "")
    if all(err["type"] == "finite_number" for err in e.errors()):
        return f"{name}: invalid numbers in the result (NaN or infinity: {shown}); the record was not kept"
    return f"{name}: invalid result ({shown}: {e.errors()[0]['msg']}); the record was not kept"


@dataclass
class MeasuredImage:
    """One image after loading and the FER stage, before reasoning; picklable (worker processes send it).

    ``rgb`` may be None when the reasoner does not look at pixels (then ``width``/``height`` still hold the
    size); ``error`` is set when the image could not be loaded or measured."""

    name: str
    rgb: np.ndarray | None
    evidence: list[FaceEvidence]
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    width: int | None = None
    height: int | None = None
    baseline: str | None = None  # which subject baseline the AUs were measured against (provenance.baseline)
    faces_skipped: int = 0  # faces detected beyond faces.max_faces, not measured (provenance.faces_skipped)
    faces: str | None = None  # how faces were found: "detect" or "whole" (provenance.faces)


def _failure_message(e: Exception) -> str:
    """A reasoner exception as a face error: a ReasonerFailure already reads "reasoner failed (<cause>):
    ..."; anything else is a model error."""
    from cem.reasoning.llm import ReasonerFailure

    return str(e) if isinstance(e, ReasonerFailure) else f"reasoner failed (model-error): {type(e).__name__}: {e}"


def _shared_failure(e: Exception) -> bool:
    """Whether ``e`` concerns every image of a batch alike (the server is unreachable, times out or refuses),
    as opposed to one image's prompt or answer."""
    from cem.reasoning.llm import ReasonerFailure

    return isinstance(e, ReasonerFailure) and (e.cause in ("timeout", "unreachable") or e.cause.startswith("http-"))

def _contexts_from_table(contexts: Any) -> Any:
    """``analyze_many``'s contexts as a list or a mapping. A pandas Series indexed by text (image paths or file
    names, unique: ``df.set_index("image")["context"]``) maps them to contexts; any other Series (a sorted or
    filtered frame's column keeps its row numbers), a NumPy or pandas array and a pandas Index are aligned with
    the images by position. Missing cells (NaN, None) are no context. Anything else that is neither a sequence
    nor a mapping (a set, an iterator) is refused: its order, or its end, is not the images'."""
    if contexts is None or isinstance(contexts, (str, Mapping, Sequence)):
        return contexts
    if not hasattr(contexts, "tolist"):
        raise TypeError(f"analyze_many: contexts must be a list aligned with the images, a mapping from the "
                        f"image's path to its context, or a pandas Series, not {type(contexts).__name__}")
    values = contexts.tolist()
    # pandas says what is missing (NaN, None, pd.NA); a NumPy array of floats can only miss NaN
    missing = (contexts.isna().tolist() if hasattr(contexts, "isna")
               else [isinstance(v, float) and math.isnan(v) for v in values])
    values = [None if gone else v for v, gone in zip(values, missing)]
    index = getattr(contexts, "index", None)
    if index is not None and hasattr(contexts, "isna"):  # a pandas Series
        keys = list(index)
        if keys and all(isinstance(k, str) for k in keys) and len(set(keys)) == len(keys):
            return {k: v for k, v in zip(keys, values) if v is not None}
    return values


def _context_given(context: str | None) -> bool:
    """Whether a prompt shows ``context`` as context: what is left of it once made inert (a context of only a
    zero-width space or control characters is none, and the prompt says so)."""
    from cem.prompting import sanitize_context

    if not context or not context.strip():
        return False
    try:
        return bool(sanitize_context(context))
    except ValueError:  # over the length limit: refused before any prompt, never shown as none
        return True


class Pipeline:
    """Faces, action units and blended emotions for images, with the configured reasoner.

    Build one with :meth:`from_config` and reuse it: the models load once, here, and serve every call.

    Example:
        ```python
        pipe = cem.Pipeline.from_config("default")
        result = pipe.analyze("photo.jpg", context="at a funeral")
        face = result.faces[0]
        print(face.top_emotion, face.emotion, result.to_dict())
        summary = pipe.annotate(["photos/"], "out.jsonl", resume=True)   # the runner the CLI uses
        ```
    """

    def __init__(self, config: Config, load_fer: bool = True, reasoner: Any = None) -> None:
        """``load_fer=False`` builds only the reasoner (a process that reasons over images measured by
        worker processes); the FER stage then loads on first use. ``reasoner``: one already built for this
        config (the pre-flight's, whose model is loaded), used instead of building another."""
        from cem.reasoning import make_reasoner

        self.config = config
        # first: a bad backend fails before models load
        self.reasoner = reasoner if reasoner is not None else make_reasoner(config)
        self._fer: Any = None
        self._fer_lock = threading.Lock()
        self._context_warned = False  # a reasoner that cannot read context says so once per pipeline
        if load_fer:
            self._fer = self._make_fer()

    def _make_fer(self) -> Any:
        from cem.fer.stage import FERStage

        return FERStage(self.config)

    @property
    def fer(self) -> Any:
        with self._fer_lock:  # two threads' first images load one stage, not two
            if self._fer is None:
                self._fer = self._make_fer()
            return self._fer

    @classmethod
    def from_config(cls, name_or_path: str | Path | Config = "default", **overrides: Any) -> Pipeline:
        """Load a config by shipped name (``configs/NAME.yaml``) or path, apply overrides, build the models. A
        :class:`~cem.config.Config` already loaded (and perhaps edited) is used as it is, with the overrides
        applied to a copy.

        Overrides: ``reasoner``, ``model``, ``template``, ``faces`` (detect|whole), ``device``, or any
        ``section__field`` (see :mod:`cem.config`).
        """
        if isinstance(name_or_path, Config):
            return cls(copy.deepcopy(name_or_path).apply(**overrides))
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(f"Pipeline.from_config takes a config name, a YAML path or a Config, not "
                            f"{type(name_or_path).__name__}")
        return cls(Config.load(name_or_path, **overrides))

    def provenance(self, timings: dict[str, float] | None = None, context: str | None = None) -> Provenance:
        """Provenance of records made by this pipeline (also for error records written by the runner)."""
        r = self.reasoner
        server = getattr(r, "base_url", None)  # the openai reasoner's, as it resolved it (the env may beat the config)
        return Provenance(cem_version=cem.__version__, config=self.config.name, reasoner=r.backend,
                          model=r.model_id, template=r.template_id, timings_ms=dict(timings or {}),
                          sampling=r.sampling, context_used=_context_given(context) and r.uses_context,
                          settings=self.config.digest({"base_url": server} if server else None),
                          expression_model=expression_model_id(self.config.expression.weights))

    def baseline(self, images: Sequence[ImageInput], faces: str | None = None, neutral: bool = False,
                 unreadable: list[str] | None = None) -> Any:
        """A subject's own reference (:class:`cem.fer.aus.SubjectBaseline`) from photos of that one person:
        their neutral photo(s) (``neutral=True``: AUs and expressions are then measured against them), or
        several of their photos (the median, of at least ``cem.fer.aus.MEDIAN_MIN_PHOTOS`` with a face; weaker,
        AUs only). Photos are loaded and measured one at a time,
        so memory does not grow with their number; ``.faces`` of the result says how many were used.

        Raises :class:`ImageLoadError` for a photo that cannot be loaded (or, given a list ``unreadable``,
        appends its error there and skips it) and ValueError when no face mesh fits in any photo, or a median
        would have fewer photos with a face than it needs."""
        if isinstance(images, (str, bytes, os.PathLike, np.ndarray)) or not isinstance(images, Sequence):
            raise TypeError(f"Pipeline.baseline takes a list of images (paths, PIL images or arrays) of one person, "
                            f"not {type(images).__name__}; for one photo pass [photo]")
        if not images:
            raise ValueError("Pipeline.baseline: no images given")
        img = self.config.image

        def loaded() -> Iterator[np.ndarray]:
            for image in images:
                try:
                    yield load_image(image, img.max_pixels, img.max_side)
                except ImageLoadError as e:
                    if unreadable is None:
                        raise
                    unreadable.append(str(e))

        return self.fer.baseline(loaded(), check_faces_mode(faces), neutral)

    def median_baseline(self, measured: Sequence[MeasuredImage]) -> Any:
        """A median baseline (AUs only, as :meth:`baseline` without ``neutral``) from photos of one person
        already measured by :meth:`measure` without a baseline, so that a subject's photos need measuring
        once (see :meth:`against`). Photos with an error do not count; ValueError when no face mesh fits."""
        return self.fer.baseline_from_faces([m.evidence for m in measured if m.error is None], neutral=False)

    def against(self, measured: MeasuredImage, baseline: Any, baseline_name: str) -> MeasuredImage:
        """A photo measured by :meth:`measure` without a baseline, as measured against a median ``baseline``
        (its AUs re-measured from the meshes; None: the average face, unchanged), recorded as
        ``baseline_name``. Same result as ``measure(image, baseline=baseline)``, without the second pass."""
        if measured.error is not None:
            return measured
        evidence = self.fer.against(measured.evidence, baseline) if baseline is not None else measured.evidence
        return dataclasses.replace(measured, evidence=evidence, baseline=baseline_name)

    def measure(self, image: ImageInput, faces: str | None = None, keep_pixels: bool = True,
                baseline: Any = None, baseline_name: str | None = None) -> MeasuredImage:
        """Load and FER-measure one image. Never raises for a bad image: the result carries ``error``.
        ``keep_pixels=False`` drops the decoded image after measuring (for reasoners that do not see it).
        ``baseline`` (from :meth:`baseline`): AUs (and, from neutral photos, expressions) against that subject's
        own neutral face; ``baseline_name`` says which (or why there is none) in ``provenance.baseline``."""
        from cem.fer.aus import SubjectBaseline

        check_faces_mode(faces)
        if baseline is not None and not isinstance(baseline, SubjectBaseline):
            raise TypeError(f"baseline must come from Pipeline.baseline (a SubjectBaseline), not "
                            f"{type(baseline).__name__}")
        name = _describe(image)
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        try:
            img = self.config.image
            rgb = load_image(image, img.max_pixels, img.max_side)
        except ImageLoadError as e:
            return MeasuredImage(name, None, [], timings, str(e))
        timings["load"] = (time.perf_counter() - t0) * 1000
        h, w = rgb.shape[:2]
        t1 = time.perf_counter()
        fer = self.fer
        with fer.lock:  # one image at a time per stage; its last_* attributes are this image's
            try:
                evidence = fer.measure(rgb, faces, baseline=baseline)
            except Exception as e:  # a model failure on one image must not end a batch; it is reported
                if is_interrupt(e):  # Ctrl-C while MediaPipe called back into Python: the user's, not the image's
                    raise KeyboardInterrupt from None
                return MeasuredImage(name, None, [], timings, f"{name}: FER stage failed ({type(e).__name__}: {e})",
                                     w, h)
            timings["fer"] = (time.perf_counter() - t1) * 1000
            timings.update(fer.last_timings)
            skipped = fer.last_faces_skipped
        if baseline is not None and baseline_name is None:  # the record still says what it was measured against
            baseline_name = baseline.describe()
        return MeasuredImage(name, rgb if keep_pixels else None, evidence, timings, None, w, h, baseline_name,
                             skipped, check_faces_mode(faces) or self.config.faces.mode)

    @property
    def needs_pixels(self) -> bool:
        """Whether the reasoner looks at the image itself (the rules reasoner reads only the evidence)."""
        return self.reasoner.backend != "rules"

    def _finish(self, m: MeasuredImage, answers: list | None, reason_error: str | None,
                context: str | None) -> ImageResult:
        result = self._fuse(m, answers, reason_error, context)
        result.provenance.baseline = m.baseline
        result.provenance.faces_skipped = m.faces_skipped or None
        if m.error is None and m.faces in FACE_MODES:
            result.provenance.faces = cast(Literal["detect", "whole"], m.faces)
        return result

    def _fuse(self, m: MeasuredImage, answers: list | None, reason_error: str | None,
              context: str | None) -> ImageResult:
        w, h = m.width, m.height
        if m.rgb is not None:
            h, w = m.rgb.shape[:2]
        if m.error is not None:
            return ImageResult(m.name, w, h, [], self.provenance(m.timings, context), error=m.error, context=context)
        by_index = {a.index: a for a in answers or []}
        t = time.perf_counter()
        results = []
        for i, ev in enumerate(m.evidence):
            a = by_index.get(ev.index)
            err = reason_error or (a.error if a else "reasoner failed (invalid-answer): no answer for this face")
            dist = a.distribution if a else None
            if dist is not None and not all(math.isfinite(v) and v >= 0 for v in dist.values()):
                # a reasoner's broken numbers are that reasoner's failure on this face, not the image's:
                # the measured evidence and the expression model's emotion still stand
                err, dist = "reasoner failed (invalid-answer): its distribution has NaN, infinite or negative " \
                    "values", None
            # a rejected answer's cues do not stand either (they would ground the rationale)
            cues = ground_cues(a.cues, ev) if a and dist is not None else []
            if dist is not None:
                dist = downweight_contradicted(dist, cues, self.config.fusion.contradicted_penalty)
            # with no reasoner distribution the emotion is the expression model's, and `error` says so
            emotion = pool(ev.expression, dist, self.config.labels, self.config.fusion)
            # the rationale explains the final (pooled) answer, whatever the reasoner
            who = "the AU prototypes" if self.reasoner.backend == "rules" else "the model"
            rationale = explain(ev, emotion, cues, dist, self.config.fusion, a.rationale if a else "", who,
                                err if dist is None else None, reasoner_answer=a.distribution if a else None)
            try:
                results.append(FaceResult(evidence=ev, emotion=emotion, cues=cues,
                                          rationale=rationale, error=err if dist is None else None))
            except ValidationError as e:  # e.g. a reasoner's NaN: this image's error record, not a crash
                return ImageResult(m.name, w, h, [], self.provenance(m.timings, context), context=context,
                                   error=_invalid_result(m.name, f"faces[{i}]", e))
        m.timings["fuse"] = (time.perf_counter() - t) * 1000
        m.timings["total"] = sum(v for k, v in m.timings.items() if k in ("load", "fer", "reason", "fuse"))
        return ImageResult(m.name, w, h, results, self.provenance(m.timings, context), context=context)

    def _reason(self, batch: list[MeasuredImage], contexts: list[str | None]) -> list[tuple[list, str | None]]:
        """Reason over several measured images at once (one model batch where the backend batches)."""
        from cem.reasoning.base import Job

        out: list[tuple[list, str | None]] = [([], None) for _ in batch]
        live = [i for i, m in enumerate(batch) if m.error is None and m.evidence]
        if not live:
            return out
        # rgb is None only for reasoners that do not look at pixels (needs_pixels is False)
        pixels = [cast(np.ndarray, batch[i].rgb) for i in live]
        if not self.reasoner.uses_context and not self._context_warned and any(contexts[i] for i in live):
            self._context_warned = True
            log.warning("the %s reasoner cannot use context: the context given is kept in the records "
                        "(provenance.context_used = false) but does not change the emotions",
                        self.reasoner.backend)
        t = time.perf_counter()
        jobs = [Job(px, batch[i].evidence, contexts[i]) for px, i in zip(pixels, live)]
        try:
            for i, a in zip(live, self.reasoner.reason_batch(jobs)):
                out[i] = (a, None)
        except Exception as e:
            if is_interrupt(e):
                raise KeyboardInterrupt from None
            if len(jobs) > 1 and not _shared_failure(e):
                # one image's problem (its prompt, its reply) must not cost the others their answers: each
                # image again on its own, so the error lands on the image that caused it
                for i, job in zip(live, jobs):
                    try:
                        out[i] = (self.reasoner.reason_batch([job])[0], None)
                    except Exception as e_one:  # reported on this image's faces; the run goes on
                        if is_interrupt(e_one):
                            raise KeyboardInterrupt from None
                        out[i] = ([], _failure_message(e_one))
            else:  # the server or model is down for every image alike: no point asking each again
                for i in live:
                    out[i] = ([], _failure_message(e))
        elapsed = (time.perf_counter() - t) * 1000
        stats = self.reasoner.last_stats
        for i in live:
            tm = batch[i].timings
            tm["reason"] = elapsed / len(live)
            if "model_ms" in stats:
                tm["reason_model"] = stats["model_ms"] / len(live)
                tm["reason_overhead"] = max(0.0, tm["reason"] - tm["reason_model"])
            for k in ("prompt_tokens", "generated_tokens"):
                if k in stats:
                    tm[k] = stats[k] / len(live)
        return out

    def reason_many(self, measured: Sequence[MeasuredImage], contexts: Sequence[str | None]) -> list[ImageResult]:
        """Reason over measured images in one call (the reasoner batches them) and fuse: one result each."""
        batch, ctx = list(measured), list(contexts)
        if len(batch) != len(ctx):
            raise ValueError(f"reason_many: {len(batch)} images but {len(ctx)} contexts")
        _check_contexts(ctx)
        return [self._finish(m, a, err, c) for m, c, (a, err) in zip(batch, ctx, self._reason(batch, ctx))]

    @property
    def batch_size(self) -> int:
        """Images per reasoning call: the reasoner's ``batch_size`` (an openai reasoner's covers its concurrency)."""
        return max(1, int(self.reasoner.batch_size))

    def analyze(self, image: ImageInput, context: str | None = None, faces: str | None = None) -> ImageResult:
        """Analyse one image (path, PIL image or RGB array). Never raises for a bad image: the result then
        carries ``error`` and no faces."""
        _check_contexts([context])
        return self.reason_many([self.measure(image, faces)], [context])[0]

    def analyze_many(self, images: Iterable[ImageInput],
                     contexts: Sequence[str | None] | Mapping[str, str] | None = None,
                     faces: str | None = None, batch_size: int | None = None) -> Iterator[ImageResult]:
        """Yield one result per image, in order. ``contexts``: a list aligned with ``images`` or a mapping
        from the image's path (as given, or its file name) to its context. Images are reasoned over in
        batches of ``batch_size`` (default: the reasoner's), so an LLM backend can share model calls. A pandas
        Series of contexts indexed by image paths or names is a mapping; any other Series (a sorted frame's
        column) is taken by position. When ``images`` (a generator) raises, the images measured before are
        answered first."""
        if isinstance(images, (str, bytes, os.PathLike, np.ndarray)) or not isinstance(images, Iterable):
            raise TypeError(f"analyze_many takes an iterable of images (paths, PIL images or arrays), not one "
                            f"{type(images).__name__}; for one image use analyze")
        if isinstance(contexts, str):
            raise TypeError("analyze_many: contexts must be a list aligned with the images or a mapping from the "
                            "image's path to its context, not one string")
        contexts = _contexts_from_table(contexts)
        if isinstance(contexts, Sequence):
            if hasattr(images, "__len__") and len(contexts) != len(images):  # type: ignore[arg-type]
                raise ValueError(f"analyze_many: {len(images)} images but {len(contexts)} contexts")  # type: ignore[arg-type]
            _check_contexts(contexts)
        check_faces_mode(faces)
        size = batch_size or self.batch_size
        chunk: list[MeasuredImage] = []
        chunk_ctx: list[str | None] = []
        n_images = 0
        source = iter(images)
        for i in itertools.count():
            try:
                image = next(source)
            except StopIteration:
                break
            except Exception:
                # the caller's generator failed: the images measured so far are still answered before the error
                # goes on, not thrown away (an interrupt, Ctrl-C, goes on at once)
                if chunk:
                    yield from self.reason_many(chunk, chunk_ctx)
                raise
            n_images = i + 1
            ctx: str | None = None
            if isinstance(contexts, Mapping):
                key = _describe(image)
                ctx = contexts.get(key) or contexts.get(Path(key).name)
            elif contexts is not None:
                if i >= len(contexts):
                    raise ValueError(f"analyze_many: more images than the {len(contexts)} contexts given")
                ctx = contexts[i]
            chunk.append(self.measure(image, faces))
            chunk_ctx.append(ctx)
            if len(chunk) >= size:
                yield from self.reason_many(chunk, chunk_ctx)
                chunk, chunk_ctx = [], []
        if isinstance(contexts, Sequence) and n_images < len(contexts):
            # images from an iterator ran out first: the contexts were not aligned with them
            raise ValueError(f"analyze_many: {n_images} images but {len(contexts)} contexts")
        if chunk:
            yield from self.reason_many(chunk, chunk_ctx)

    def annotate(self, inputs: str | os.PathLike | Iterable[str | os.PathLike], out: str | os.PathLike,
                 **kwargs: Any) -> Any:
        """Annotate files, folders, globs and CSV manifests (one path, or a list) into the JSONL file ``out``: the
        runner the CLI,
        notebooks and engines use (resume, lock, workers, progress, summary). Keyword arguments: see
        :func:`cem.runner.annotate`. Returns a :class:`cem.runner.RunSummary`."""
        from cem.runner import annotate

        return annotate(self, inputs, out, **kwargs)

    def analyze_video(self, path: str | os.PathLike, context: str | None = None, every: int | None = None,
                      fps: float | None = None, options: Any = None,
                      meta: Mapping[str, Any] | None = None, stats: Any = None,
                      landmarks: bool = False) -> Iterator[Any]:
        """Stream a video: yields a :class:`cem.video.VideoFrame` per processed frame (tracked, smoothed
        faces; ``moments`` holds the contract records of the key moments reasoned on that frame).

        ``every``: process every Nth frame; ``fps``: sample at that rate; ``options``: a
        :class:`cem.video.VideoOptions` for tracking, smoothing and key-moment settings; ``meta``: the
        manifest columns written in each key moment's record; ``stats``: a :class:`cem.video.DecodeStats`
        that is filled in with the frames the file declares and the frames decoded (``stats.cut_short`` after
        the last frame: the file ended early, cut or damaged); ``landmarks``: each key moment's face carries
        its 478-point mesh, as image records do with ``--landmarks``.
        """
        from cem.contract import moment_record
        from cem.video import VideoOptions, sampling_label, track_video

        opts = dataclasses.replace(options or VideoOptions())  # the caller's options are never changed
        if every is not None:
            opts.every = every
        if fps is not None:
            opts.fps = fps
        opts.check()
        # NumPy scalars (a DataFrame row's cells) as the Python values a record stores (an int64 became 3.0)
        meta = None if meta is None else {k: v.item() if isinstance(v, np.generic) else v for k, v in meta.items()}
        for key, value in (meta or {}).items():  # checked now: a bad one failed at the first key moment
            if (not isinstance(key, str) or not isinstance(value, (str, int, float))
                    or (isinstance(value, float) and not math.isfinite(value))):
                raise ValueError(f"meta {key!r}: {value!r} is not a value a record can hold (text, a whole or "
                                 f"finite number, true/false)")
        opts.every = None if opts.every is None else int(opts.every)
        opts.fps = None if opts.fps is None else float(opts.fps)
        _check_contexts([context])  # before the first frame, as analyze does (it failed at the first key moment)
        name = os.fsdecode(os.fspath(path))
        sampling = sampling_label(opts.every, opts.fps)
        for vf in track_video(self.fer, name, self.config.labels, opts, stats):
            keys = [f for f in vf.faces if f.key]
            if keys and opts.reason:
                timings: dict[str, float] = {}
                evidence = [f.evidence for f in keys]
                for i, ev in enumerate(evidence):
                    ev.index = i
                m = MeasuredImage(name, vf.rgb, evidence, timings, None, vf.width, vf.height, faces="detect")
                result = self.reason_many([m], [context])[0]
                for face, tf in zip(result.faces, keys):
                    vf.moments.append(moment_record(
                        result, face, video=name, frame=vf.frame, time=vf.time, track_id=tf.track_id,
                        t_start=tf.t_start, key_reason=tf.key_reason or "", meta=meta, landmarks=landmarks,
                        frame_sampling=sampling))
            vf.rgb = None  # do not hold decoded frames beyond this step
            yield vf

    def close(self) -> None:
        """Release the FER stage's detectors and mesher. Closing twice is harmless, and a closed pipeline
        that is used again (or an ``analyze_many`` iterator read after ``close``) loads them anew."""
        with self._fer_lock:
            if self._fer is not None:
                self._fer.close()
                self._fer = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
