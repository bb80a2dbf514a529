"""Where records go: the JSONL output (locked, resumable, always valid JSON). Tables are derived from it by
:func:`cem.results.write_table`, the one table writer (``--csv`` and ``cem table``).

Decisions (documented here because every writer and reader of cem output relies on them):

- **Names that are not UTF-8.** Paths are kept as given. On POSIX a file name with bytes that are not
  UTF-8 reaches Python with those bytes as surrogate escapes (U+DC80..U+DCFF). Such a record's ``image``
  shows each undecodable byte as the four characters ``\\xNN`` and adds ``image_bytes``: the exact name
  (``os.fsencode``), base64-encoded, so the path is recoverable losslessly. Records of valid UTF-8 names
  have no ``image_bytes``. Resume keys records by ``image_bytes`` when present.
- **Other strings** (a model's rationale, an error message quoting a path) are written as valid UTF-8:
  surrogate escapes become ``\\xNN`` as above; any other lone surrogate (e.g. ``"caf\\udce9"`` in a model
  reply, valid JSON but not valid Unicode) becomes U+FFFD.
- **Numbers.** JSON is written with ``allow_nan=False``. A record holding NaN or an infinity (e.g. a
  reasoner's NaN log-probability) is replaced by an error record for that image naming the fields
  (:func:`cem.contract.error_record`), so the file stays valid JSON and nothing downstream scores a NaN
  silently.
- **Resume never deletes.** Lines that are not JSON objects with an ``image`` string (corrupt, non-object,
  a half-written last line) are moved to ``OUT.rejected`` beside the output (appended, never overwritten)
  and reported, as is a second record of an input already recorded above it (the first stays); the other
  records stay, in order. Records are keyed by (image, context, manifest columns under
  ``meta``), so two manifest rows for one image with different contexts (or subjects) are two records.
- **One writer.** ``OUT.lock`` beside the output (its real path, symlinks resolved) is held with an exclusive
  ``flock`` for the whole run; a second run on the same output is refused at once with a message naming the
  output (exit status 2). (Two *hard* links to one file are two names the lock cannot tell apart.)
- **Nothing replaced by accident.** An output that already holds records is continued with ``resume`` or
  replaced with ``overwrite``; without either the run is refused before anything is written.
"""

from __future__ import annotations

import base64
import json
import math
import os
import stat
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cem.io import os_reason, path_key

if TYPE_CHECKING:
    from cem.contract import ImageResult

RecordKey = tuple[Any, Any, Any]  # (image, or image_bytes for a name that is not UTF-8; context; meta)


class OutputError(RuntimeError):
    """The output cannot be written (unwritable place, a folder, in use by another run)."""


def _escape_surrogates(s: str) -> str:
    out = []
    for ch in s:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF:  # any other lone surrogate: not Unicode text
            out.append("\ufffd")
        else:
            out.append(ch)
    return "".join(out)


def safe_text(s: str) -> str:
    """``s`` as valid Unicode (encodable as UTF-8); unchanged when it already is."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return _escape_surrogates(s)


def image_fields(path: str) -> dict[str, str]:
    """The ``image`` field of a record for ``path`` (and ``image_bytes`` when the name is not UTF-8)."""
    shown = safe_text(path)
    if shown == path:
        return {"image": path}
    return {"image": shown, "image_bytes": base64.b64encode(os.fsencode(path)).decode("ascii")}


def table_format(path: str | os.PathLike) -> str:
    """"csv" or "parquet" from a table's file name (``--csv``, ``--frames``, ``cem table``); ValueError naming
    the file for another suffix, or for Parquet without pyarrow."""
    import importlib.util

    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise ValueError(f"{os.fspath(path)}: the table must end in .csv or .parquet")
    if suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise ValueError(f"{os.fspath(path)}: Parquet tables need pyarrow (pip install pyarrow); or use .csv")
    return suffix[1:]


def meta_key(meta: dict[str, Any] | None) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), safe_text(str(v))) for k, v in (meta or {}).items()))


def input_key(path: str, context: str | None, extra: dict[str, str] | None = None) -> RecordKey:
    """The resume key of an input: the same as :func:`record_key` of the record it produces (``extra``: the
    manifest's other columns, which the record carries as ``meta``: one image in two rows for two subjects is
    two inputs)."""
    fields = image_fields(path)
    return (_bytes_key(path) if "image_bytes" in fields else path_key(fields["image"]), context, meta_key(extra))


def _bytes_key(path: str) -> str:
    """The key of a name that is not UTF-8: its exact bytes in their normal spelling (:func:`path_key`), base64."""
    return base64.b64encode(os.fsencode(path_key(path))).decode("ascii")


def moment_key(video: str, context: str | None, frame: Any, track_id: Any, meta: dict[str, Any] | None
               ) -> tuple[Any, ...]:
    """A key moment's identity for ``--resume``: its video (:func:`path_key`), context, frame, track and manifest
    columns."""
    return (path_key(video), context, frame, track_id, meta_key(meta))


def record_key(record: dict[str, Any]) -> RecordKey:
    exact = record.get("image_bytes")
    if isinstance(exact, str) and exact:
        try:  # its exact name in its normal spelling, as input_key keys it
            image = _bytes_key(os.fsdecode(base64.b64decode(exact, validate=True)))
        except (ValueError, TypeError):
            image = exact
    else:
        image = path_key(record.get("image"))
    return (image, record.get("context"), meta_key(record.get("meta")))


def clean(value: Any, where: str, bad: list[str] | None) -> Any:
    """A JSON-ready copy: strings made valid Unicode, numpy scalars and arrays made Python, non-finite
    numbers listed in ``bad`` (by their place in the record), or made null when ``bad`` is None."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            if bad is None:
                return None
            bad.append(f"{where} = {value}")
        return value
    if isinstance(value, dict):
        return {safe_text(str(k)): clean(v, f"{where}.{k}" if where else str(k), bad) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v, f"{where}[{i}]", bad) for i, v in enumerate(value)]
    if hasattr(value, "tolist"):  # numpy scalar or array
        return clean(value.tolist(), where, bad)
    return clean(str(value), where, bad)


def finalize(record: dict[str, Any]) -> dict[str, Any]:
    """The record as it is written: image fields made lossless, text valid, numbers finite (else an error
    record for that image that names the offending fields)."""
    rec = dict(record)
    image = rec.get("image")
    if isinstance(image, str):
        rec.update(image_fields(image))
    bad: list[str] = []
    out = clean(rec, "", bad)
    if not bad:
        return out
    from cem.contract import error_record

    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    provenance = _finite_provenance(record.get("provenance") or {})
    image = str(out.get("image"))
    return error_record(image, f"{image}: invalid numbers in the result (NaN or infinity: {shown}); the record "
                               f"was not kept", provenance, out.get("context"), out.get("meta"),
                        video=out.get("video"), width=out.get("width"), height=out.get("height"),
                        image_bytes=out.get("image_bytes"))


def _finite_provenance(provenance: Any) -> dict[str, Any]:
    """A provenance as a dict whose non-finite timings are dropped (for the error record replacing a result)."""
    from cem.contract import Provenance

    prov = clean(provenance.to_dict() if isinstance(provenance, Provenance) else dict(provenance),
                 "provenance", None)
    prov["timings_ms"] = {k: v for k, v in (prov.get("timings_ms") or {}).items() if v is not None}
    return {k: v for k, v in prov.items() if v is not None or k in ("model", "template")}


def result_record(result: ImageResult, landmarks: bool = False) -> dict[str, Any]:
    """The record of a pipeline result as it is written (``landmarks``: each face's mesh too), by every
    engine. A result the contract refuses is replaced by that image's error record naming the fields, so
    one bad result never ends a run."""
    from cem.contract import RecordError, error_record

    try:
        record = result.to_dict(landmarks=landmarks)
    except RecordError as e:
        image = safe_text(result.image)
        detail = str(e).split(": not a valid record: ", 1)[-1]
        record = error_record(result.image, f"{image}: invalid result ({detail}); the record was not kept",
                              _finite_provenance(result.provenance), result.context, result.meta,
                              width=result.width, height=result.height)
    return finalize(record)


def dumps(record: dict[str, Any]) -> str:
    """One JSONL line (without newline) for an already :func:`finalize`-d record."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False)


class OutputLock:
    """An exclusive ``flock`` on ``OUT.lock`` beside the output, held for a run; refused at once if held."""

    def __init__(self, output: Path) -> None:
        import fcntl

        # beside the real file (os.path.realpath follows symlinks, and unlike Path.resolve does not raise on a
        # loop): a second run writing through a symlink to the same file takes the same lock
        real = Path(os.path.realpath(output))
        self.path = real.with_name(real.name + ".lock")
        self._fd: int | None = None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise OutputError(f"{output}: cannot write beside it ({self.path}: {os_reason(e)})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputError(f"{output} is being written by another cem run (it holds {self.path}); "
                                  f"wait for it to finish or write to another file") from None
            # the lock file may have been removed (and a new one made) by a finishing run since we opened it
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # still held: no other run can hold this file now
        except OSError:
            pass  # a lock file left behind is harmless: the next run locks it again
        os.close(self._fd)
        self._fd = None


@dataclass
class ExistingOutput:
    """What an output file holds before a resumed run."""

    keys: set[RecordKey] = field(default_factory=set)  # (image, context, meta) of every image record
    moments: set[tuple[Any, ...]] = field(default_factory=set)  # moment_key of every key moment
    videos_done: set[RecordKey] = field(default_factory=set)  # videos with a summary or an error record
    rejected: list[bytes] = field(default_factory=list)  # lines moved to OUT.rejected
    repaired_tail: bool = False  # the last record lacked its newline
    duplicates: int = 0  # records of inputs already recorded above them (moved to OUT.rejected, in rejected)
    torn_tail: bool = False  # the last line was a fragment (a crash while writing it)
    retried: int = 0  # error records left out, to be done again (--retry-errors)
    # how the records that are not errors were made: MADE_WITH fields of their provenance -> how many
    made_with: dict[tuple[Any, ...], int] = field(default_factory=dict)
    baselines: set[str] = field(default_factory=set)  # provenance.baseline of the records (subject baselines)
    # video (record_key) -> the frame_sampling of its key moments (a video interrupted at one sampling)
    moment_sampling: dict[RecordKey, set[str]] = field(default_factory=dict)


MADE_WITH = ("config", "settings", "faces", "reasoner", "model", "template", "expression_model")
"""The provenance fields that say how a record was made; ``--resume`` notes records made otherwise."""


def settings_differ(made_with: dict[tuple[Any, ...], int], current: tuple[Any, ...]) -> str | None:
    """What differs between this run's :data:`MADE_WITH` values and those of earlier records (a field an older
    record lacks is not compared), as one phrase with how many records; None when nothing does."""
    n, fields = 0, set()
    for made, count in made_with.items():
        diff = [k for k, old, new in zip(MADE_WITH, made, current) if old is not None and old != new]
        if diff:
            n += count
            fields.update(diff)
    if not n:
        return None
    now = ", ".join(f"{k} {v}" for k, v in zip(MADE_WITH, current) if k in fields)
    return f"{n} record(s) were made with another {', '.join(k for k in MADE_WITH if k in fields)} (this run: {now})"


def _reasoner_failed(rec: dict[str, Any]) -> bool:
    """Whether the reasoner failed on a face of ``rec`` (a server that was down, a timeout, an invalid answer):
    the image was measured, but its emotions rest on the expression model alone; ``--retry-errors`` redoes it."""
    from cem.pipeline import reasoner_failure_cause

    faces = rec.get("faces")
    return isinstance(faces, list) and any(
        isinstance(f, dict) and isinstance(f.get("error"), str) and reasoner_failure_cause(f["error"]) is not None
        for f in faces)


def mixed_settings(source: str | None, images_by_settings: dict[str, int]) -> str | None:
    """What to say when the records of ``source`` were made with several settings (``provenance.settings``
    digest -> how many images; "unrecorded" for records without one), or None when with one. The one message
    of read_results' warning, ``cem table``, ``cem report`` and ``cem eval``, which all pool the records."""
    if len(images_by_settings) <= 1:
        return None
    counts = ", ".join(f"{k}: {v} image(s)" for k, v in images_by_settings.items())
    return (f"{source + ': ' if source else ''}the records were made with {len(images_by_settings)} different "
            f"settings ({counts}); compare like with like by grouping on provenance_settings")


def settings_of(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """``provenance.settings`` digest -> how many distinct images of ``records`` were made with it."""
    seen: dict[str, set[Any]] = {}
    for rec in records:
        prov = rec.get("provenance")
        digest = prov.get("settings") if isinstance(prov, Mapping) else None
        seen.setdefault(digest if isinstance(digest, str) else "unrecorded", set()).add(str(rec.get("image")))
    return {k: len(v) for k, v in sorted(seen.items())}


def _is_record(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("image"), str)


def _parse(line: bytes) -> Any:
    """A JSONL line's value, or None for one that is not JSON (not UTF-8, a huge number, nesting beyond the
    stack)."""
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def iter_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The records of a JSONL output, streamed and as written, without validating them (merging and resuming
    keep records as they are); lines that are not records (a half-written last line) are skipped."""
    with open(path, "rb") as fh:
        for line in fh:
            if not line.strip():
                continue
            rec = _parse(line)
            if _is_record(rec):
                yield rec


def scan(path: Path, retry: Container[RecordKey] = frozenset()) -> tuple[ExistingOutput, list[bytes]]:
    """Read an output: what it holds and its good lines (bytes, each ending in a newline). The error records
    of the inputs in ``retry`` (an image's, or a video's that could not be read, or an image record on one of
    whose faces the reasoner failed) are left out of both, so that those inputs are done again
    (``--retry-errors``); a key moment is never an error record."""
    found = ExistingOutput()
    good: list[bytes] = []
    data = path.read_bytes() if path.exists() else b""
    for line in data.splitlines(keepends=True):
        if not line.strip():
            continue
        rec = _parse(line)
        if not _is_record(rec):
            found.torn_tail = not line.endswith(b"\n")
            found.rejected.append(line if line.endswith(b"\n") else line + b"\n")
            continue
        if not line.endswith(b"\n"):
            found.repaired_tail = True
            line += b"\n"
        key = record_key(rec)
        if "frame" not in rec and key in retry and (rec.get("error") or _reasoner_failed(rec)):
            found.retried += 1
            continue
        if "video" not in rec and key in found.keys:
            # an input recorded twice (a run stopped while it wrote a batch could write the batch again, before
            # this was mended): the first record stays, the copy goes to OUT.rejected (eval refused such a file)
            found.duplicates += 1
            found.rejected.append(line)
            continue
        good.append(line)
        if not rec.get("error") and isinstance(rec.get("provenance"), dict):
            made = tuple(rec["provenance"].get(k) for k in MADE_WITH)
            found.made_with[made] = found.made_with.get(made, 0) + 1
            if isinstance(rec["provenance"].get("baseline"), str):
                found.baselines.add(rec["provenance"]["baseline"])
        if "video" in rec and "frame" in rec:  # a key moment
            found.moments.add(moment_key(rec["video"], rec.get("context"), rec.get("frame"), rec.get("track_id"),
                                         rec.get("meta")))
            if isinstance(rec.get("frame_sampling"), str):
                found.moment_sampling.setdefault(key, set()).add(rec["frame_sampling"])
        elif "video" in rec:  # a video's summary (written when it was finished) or its error record
            found.videos_done.add(key)
        else:
            found.keys.add(key)
    return found, good


def holds_something(path: Path) -> bool:
    """Whether ``path`` is a file with anything but whitespace in it (read until the first such byte)."""
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 16):
                if chunk.strip():
                    return True
    except OSError:
        return True  # unreadable: let the caller's own open report it rather than replace it unseen
    return False


class JsonlSink:
    """The JSONL output of a run: locked, repaired on resume, one flushed line per record."""

    def __init__(self, path: str | os.PathLike, resume: bool = False, retry: Container[RecordKey] = frozenset(),
                 overwrite: bool = False) -> None:
        """Check the place and take the lock (nothing is written yet: see :meth:`open`); with ``resume``,
        read what the output already holds (``existing``), less the error records of the inputs in ``retry``,
        which :meth:`open` removes from the file. An output that already holds something is replaced only
        with ``overwrite`` (a forgotten ``--resume`` must not empty a finished run's file)."""
        self.path = Path(path)
        self.resume = resume
        self._fh: IO[bytes] | None = None
        self._write_failed = False
        if self.path.is_dir():
            raise OutputError(f"{self.path}: is a folder; give a file name for the output")
        if self.path.exists() and not self.path.is_file():  # a FIFO or device would block or not resume
            raise OutputError(f"{self.path}: not a regular file; give a file name for the output")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot create its folder {self.path.parent} ({os_reason(e)})") from None
        self.lock = OutputLock(self.path)
        if not resume and not overwrite and holds_something(self.path):
            self.lock.release()  # checked under the lock: a run writing it now is named as such first
            raise OutputError(f"{self.path} already holds the records of an earlier run; --resume continues it "
                              f"(skips what is done), --overwrite replaces it, or write to another file")
        self.existing = ExistingOutput()
        self._good: list[bytes] = []
        self.written = 0
        try:
            if resume and self.path.exists():
                self.existing, self._good = scan(self.path, retry)
        except OSError as e:
            self.lock.release()
            raise OutputError(f"{self.path}: cannot read it to resume ({os_reason(e)})") from None
        torn_only = len(self.existing.rejected) == 1 and self.existing.torn_tail
        if self.existing.rejected and not self._good and not torn_only:
            self.lock.release()
            raise OutputError(f"{self.path}: holds no cem record ({len(self.existing.rejected)} other lines); "
                              f"refusing to resume into it (is it the right file?)")

    def open(self) -> None:
        """Start writing: truncate (a new run) or repair and append (``resume``)."""
        try:
            if self.existing.rejected or self.existing.repaired_tail or self.existing.retried:
                self._rewrite(self._good)
            self._good = []
            self._fh = open(self.path, "ab" if self.resume else "wb")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write ({os_reason(e)})") from None

    @property
    def rejected_path(self) -> Path:
        return self.path.with_name(self.path.name + ".rejected")

    def _rewrite(self, good: list[bytes]) -> None:
        """Move rejected lines to OUT.rejected (appended), then leave only the good lines in OUT.

        OUT is the file a link names (a link stays a link, and the file it points to is the one repaired). When
        the good lines are the file's beginning (a torn last line, a last record without its newline: the
        usual leftovers of a stopped run) the file is cut or ended in place: no room for a copy is needed, and
        its mode, owner and hard links stay. Otherwise a copy replaces it atomically, with the file's mode;
        a copy that cannot be completed (a full disk) is removed, and OUT.rejected is restored, so that the
        next attempt starts as this one did."""
        target = Path(os.path.realpath(self.path))
        kept = b"".join(good)
        rejected_before = self.rejected_path.stat().st_size if self.rejected_path.exists() else None
        if self.existing.rejected:
            with open(self.rejected_path, "ab") as fh:
                fh.writelines(self.existing.rejected)
                fh.flush()
                os.fsync(fh.fileno())
        changed = False  # once OUT is changed, the lines it no longer holds must stay in OUT.rejected
        try:
            with open(target, "r+b") as fh:
                head = fh.read(len(kept) + 1)
                if head[: len(kept)] == kept:  # the good lines, then the lines to drop: cut them off
                    changed = True
                    fh.truncate(len(kept))
                elif kept.endswith(b"\n") and head == kept[:-1]:  # all good, the last lacks its newline
                    changed = True
                    fh.seek(len(kept) - 1)
                    fh.write(b"\n")
                if changed:
                    fh.flush()
                    os.fsync(fh.fileno())
                    return
            self._replace(target, good)
        except BaseException:
            if not changed and not self._replaced(target, kept):
                if rejected_before is None:
                    self.rejected_path.unlink(missing_ok=True)
                elif self.existing.rejected:
                    with open(self.rejected_path, "r+b") as fh:
                        fh.truncate(rejected_before)
            raise

    @staticmethod
    def _replaced(target: Path, kept: bytes) -> bool:
        """Whether ``target`` already holds just ``kept`` (the copy was put in place before something failed)."""
        try:
            return target.stat().st_size == len(kept) and target.read_bytes() == kept
        except OSError:
            return False

    @staticmethod
    def _replace(target: Path, good: list[bytes]) -> None:
        """``target`` replaced by ``good`` through a copy beside it (a short, unique name: the output's own name
        may already be near the file system's limit, and another output in the folder may be repaired at the
        same time), with ``target``'s mode."""
        import tempfile

        fd, name = tempfile.mkstemp(dir=target.parent, prefix=".cem-rewrite.", suffix=".tmp")  # unique per call
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.writelines(good)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write one record (see :func:`finalize`); returns what was written."""
        if self._fh is None:
            self.open()
        assert self._fh is not None
        rec = finalize(record)
        try:
            self._fh.write(dumps(rec).encode("utf-8") + b"\n")
            self._fh.flush()
        except OSError as e:  # a full disk or a lost mount: say which file, and that what is written stays
            self._write_failed = True
            raise self._cannot_write(e) from None
        self.written += 1
        return rec

    def _cannot_write(self, e: OSError) -> OSError:
        return OSError(e.errno, f"{self.path}: cannot write ({os_reason(e)}); the records written before are "
                                f"kept: make room and run again with --resume")

    def write_result(self, result: ImageResult, landmarks: bool = False) -> dict[str, Any]:
        """Write the record of a pipeline result (see :func:`result_record`); returns what was written."""
        return self.write(result_record(result, landmarks))

    def close(self) -> None:
        try:
            if self._fh is not None:
                fh, self._fh = self._fh, None
                try:
                    fh.close()  # flushes what the buffer still holds: on a full disk, the failed write again
                except OSError as e:
                    if not self._write_failed:  # else it would hide the message that names the file
                        raise self._cannot_write(e) from None
        finally:
            self.lock.release()

    def __enter__(self) -> JsonlSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
