"""Inputs and outputs: image loading and validation, input expansion, JSONL writing.

Every problem with one input becomes an :class:`ImageLoadError` whose message names the input and the
problem; the pipeline turns it into that image's ``error`` record and goes on with the rest.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Union

import numpy as np

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)

ImageInput = Union[str, os.PathLike, np.ndarray, "PIL.Image.Image"]  # noqa: F821


class ImageLoadError(ValueError):
    """An input that is not a usable image (unreadable, empty, truncated, too large, not an image)."""


def load_image(source: ImageInput, max_pixels: int = 50_000_000) -> np.ndarray:
    """Return the image as an upright RGB uint8 array of shape (H, W, 3).

    EXIF orientation is applied; grayscale, palette, RGBA (composited on white), 16-bit, CMYK and other
    modes are converted to RGB. ``max_pixels`` guards against decompression bombs.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        return _pil_to_rgb(ImageOps.exif_transpose(source) or source)
    path = Path(source)
    if not path.exists():
        raise ImageLoadError(f"{path}: file not found")
    if path.is_dir():
        raise ImageLoadError(f"{path}: is a folder, not an image")
    if path.stat().st_size == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageLoadError(f"{path}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
                im.load()
                upright = ImageOps.exif_transpose(im) or im
                return _pil_to_rgb(upright)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{path}: decompression bomb refused ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"{path}: corrupt or truncated image ({e})") from None


def _pil_to_rgb(im: Any) -> np.ndarray:
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if a.max() > 255 else 255.0
        g = np.clip(a / top * 255.0, 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        g = np.clip(a * 255.0 if a.max() <= 1.0 else a, 0, 255).astype(np.uint8)
        return np.repeat(g[:, :, None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.uint8)
    if arr.size == 0:
        raise ImageLoadError("image has no pixels")
    return np.ascontiguousarray(arr)


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageLoadError(f"array of shape {a.shape} is not an (H, W[, 1|3|4]) image")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.shape[2] == 4:
        a = a[:, :, :3]
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.max() <= 1.0:
            a = a * 255.0
        elif a.dtype == np.uint16:
            a = a / 257.0
        a = np.clip(a, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Files, folders (recursive, image extensions only, sorted) and globs -> list of paths as given.

    A file named explicitly is kept whatever its extension (so that a bad file gets an error record);
    a name that matches nothing is kept too, and fails at load time with "file not found".
    """
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        if p not in seen:
            seen.add(p)
            out.append(p)

    for item in inputs:
        s = os.fspath(item)
        p = Path(s)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    add(str(f))
        elif p.exists():
            add(s)
        elif glob.has_magic(s):
            for m in sorted(glob.glob(s, recursive=True)):
                mp = Path(m)
                if mp.is_file():
                    add(m)
                elif mp.is_dir():
                    for f in sorted(mp.rglob("*")):
                        if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                            add(str(f))
        else:
            add(s)
    return out


@dataclass
class InputItem:
    """One image to process: its path as it will appear in the record, its context, manifest extras."""

    path: str
    context: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


def read_manifest(path: str | os.PathLike) -> list[InputItem]:
    """A CSV manifest: column ``image`` (relative paths are relative to the manifest's folder), optional
    ``context``, and any other columns, which are carried into the output records."""
    import csv

    base = Path(path).parent
    items = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "image" not in reader.fieldnames:
            raise ValueError(f"{path}: a manifest needs an 'image' column")
        reserved = {"image", "context", "width", "height", "faces", "error", "provenance"}
        for n, row in enumerate(reader, start=2):
            img = (row.get("image") or "").strip()
            if not img:
                raise ValueError(f"{path}:{n}: empty 'image' cell")
            p = img if os.path.isabs(img) else str(base / img)
            extra = {k: v for k, v in row.items() if k not in reserved and k is not None}
            items.append(InputItem(p, (row.get("context") or None), extra))
    return items


def collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[InputItem]:
    """Like :func:`expand_inputs`, and an input ending in ``.csv`` is read as a manifest."""
    items: list[InputItem] = []
    plain: list[str] = []

    def flush() -> None:
        items.extend(InputItem(p) for p in expand_inputs(plain))
        plain.clear()

    for i in inputs:
        if os.fspath(i).lower().endswith(".csv") and Path(i).is_file():
            flush()
            items.extend(read_manifest(i))
        else:
            plain.append(os.fspath(i))
    flush()
    return items


def read_context_csv(path: str | os.PathLike) -> dict[str, str]:
    """``image,context`` CSV -> {image: context}. Keys are matched by path as given and by file name."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"image", "context"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: a context file needs the columns 'image' and 'context'")
        return {row["image"]: row["context"] or "" for row in reader}


class JsonlWriter:
    """Appends one JSON object per line and flushes each, so a crash loses at most the line being written."""

    def __init__(self, path: str | os.PathLike, append: bool = False) -> None:
        self.path = Path(path)
        self._fh: IO[str] = open(self.path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Records of a JSONL file; a half-written last line (crash) is skipped."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def face_rows(record: dict[str, Any], labels: list[str], au_codes: list[str],
              extra_columns: list[str] = ()) -> list[dict[str, Any]]:
    """One flat row per face of a record (one row with empty face fields for an image without faces)."""
    base = {"image": record["image"]}
    base.update({k: record.get(k, "") for k in extra_columns})
    rows = []
    for f in record.get("faces") or [None]:
        row = dict(base)
        if f is None:
            rows.append(row | {"error": record.get("error") or ""})
            continue
        x, y, w, h = f["bbox"]
        pose = f.get("pose") or {}
        q = f.get("quality") or {}
        row.update({"face_index": f["index"], "x": x, "y": y, "w": w, "h": h,
                    "detection_score": f["detection_score"], "yaw": pose.get("yaw", ""),
                    "pitch": pose.get("pitch", ""), "roll": pose.get("roll", ""),
                    "face_px": q.get("face_px", ""), "blur": q.get("blur", ""),
                    "extreme_pose": q.get("extreme_pose", ""), "mesh_failed": q.get("mesh_failed", "")})
        for au in au_codes:
            a = f["aus"].get(au)
            row[au] = a["intensity"] if a else ""
        for lab in labels:
            row[f"expression_{lab}"] = f["expression"].get(lab, "")
        for lab in labels:
            row[f"emotion_{lab}"] = f["emotion"].get(lab, "")
        row["top_emotion"] = f["top_emotion"]
        row["error"] = f.get("error") or record.get("error") or ""
        rows.append(row)
    return rows


def csv_columns(labels: list[str], au_codes: list[str], extra_columns: list[str] = ()) -> list[str]:
    """The stable column order of ``--csv`` tables."""
    return (["image", *extra_columns, "face_index", "x", "y", "w", "h", "detection_score", "yaw", "pitch", "roll",
             "face_px", "blur", "extreme_pose", "mesh_failed", *au_codes]
            + [f"expression_{lab}" for lab in labels] + [f"emotion_{lab}" for lab in labels]
            + ["top_emotion", "error"])


class CsvFaceWriter:
    """Writes one row per face with :func:`csv_columns`, flushed per image."""

    def __init__(self, path: str | os.PathLike, labels: list[str], au_codes: list[str],
                 extra_columns: list[str] = (), append: bool = False) -> None:
        import csv

        self.labels, self.au_codes, self.extra = list(labels), list(au_codes), list(extra_columns)
        self.columns = csv_columns(self.labels, self.au_codes, self.extra)
        exists = append and Path(path).is_file() and Path(path).stat().st_size > 0
        self._fh = open(path, "a" if exists else "w", newline="", encoding="utf-8")
        self._w = csv.DictWriter(self._fh, fieldnames=self.columns, extrasaction="ignore")
        if not exists:
            self._w.writeheader()

    def write(self, record: dict[str, Any]) -> None:
        for row in face_rows(record, self.labels, self.au_codes, self.extra):
            self._w.writerow(row)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
