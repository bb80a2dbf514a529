"""Inputs: image loading and validation, and input expansion (files, folders, globs, CSV manifests).

Every problem with one input becomes an :class:`ImageLoadError` (or an :class:`InputItem` carrying
``error``) whose message names the input and the problem; the runner turns it into that input's error
record and goes on with the rest. Paths are kept exactly as given (``str``; a name that is not valid
UTF-8 keeps its undecodable bytes as surrogate escapes, as :func:`os.fsdecode` gives them); the sink
writes them losslessly (see :mod:`cem.sinks`).
"""

from __future__ import annotations

import errno
import glob
import os
import re
import stat
import struct
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from cem.contract import MAX_CONTEXT_CHARS  # contexts longer than this are refused per row

if TYPE_CHECKING:
    import PIL.Image

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
# The loader refuses only what no image format should hold: a side beyond 65,535 px (JPEG's and WebP's
# limit; larger sides come from crafted PNG/TIFF files) and more pixels than image.max_pixels (a
# decompression bomb). Large or elongated but legal images are analysed: the FER stage bounds every
# region it hands to OpenCV and MediaPipe itself (cem.fer.detect), so no side reaches OpenCV's SHRT_MAX.
MAX_SIDE = 65_535
# CSV fields may be this large (the csv module's default is 128 KiB); larger ones are an error for that file.
CSV_FIELD_LIMIT = 16 * 1024 * 1024

ImageInput = Union[str, os.PathLike, np.ndarray, "PIL.Image.Image"]


class ImageLoadError(ValueError):
    """An input that is not a usable image (unreadable, empty, truncated, too large, not an image)."""


class InputError(ValueError):
    """Inputs that cannot be used at all (a manifest without an 'image' column, nothing found, ...)."""


def os_reason(e: OSError) -> str:
    """A short, stable description of why a file system call failed."""
    reasons = {errno.ENOENT: "file not found", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.ELOOP: "symbolic link loop", errno.ENOTDIR: "a part of the path is not a folder",
               errno.ENAMETOOLONG: "name too long", errno.EIO: "input/output error",
               errno.EISDIR: "is a folder, not an image"}
    return reasons.get(e.errno or 0, (e.strerror or type(e).__name__).lower())


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _normal_path(path: str) -> str:
    """``path`` without ``.`` parts, doubled and trailing separators (``./a//b/`` -> ``a/b``); ``..`` is kept, since
    removing it as text (``os.path.normpath``) names another file when the part before it is a link. URLs and
    empty names as they are."""
    if not path or _URL.match(path):
        return path
    parts = path.split(os.sep)
    kept = [p for p in parts[1:] if p not in ("", ".")]
    if parts[0] == "":  # absolute
        return os.sep + os.sep.join(kept)
    head = [] if parts[0] == "." else [parts[0]]
    return os.sep.join(head + kept) or "."


def path_key(image: Any) -> Any:
    """An image path as keys compare it (``--resume``, de-duplication): in its normal spelling
    (:func:`_normal_path`), so ``set40/x.jpg``, ``./set40/x.jpg`` and ``set40//x.jpg`` are one input. Text only:
    an absolute and a relative name of one file stay two (a record's relative name means the file in the folder
    its run was started from, which a later run cannot know; resolving it against the resuming run's folder
    skipped another folder's file of that name). Other values as they are."""
    return _normal_path(image) if isinstance(image, str) else image


def same_file(path: str) -> str:
    """The file ``path`` names, links resolved (``os.path.realpath``): for telling whether two names of this
    run are one file, never for matching an earlier run's records."""
    return os.path.realpath(path)


def url_problem(name: str) -> str | None:
    """What is wrong with ``name`` when it is a URL (it read "file not found"): cem never downloads inputs.
    Images and videos raise their own error with it."""
    if _URL.match(name):
        return f"{name}: a URL; cem reads local files only (it never downloads): download it first and pass the " \
               f"file's path"
    return None


def check_geometry(name: str, width: int, height: int, max_pixels: int, max_side: int = MAX_SIDE) -> None:
    """Refuse sizes the FER stage cannot take, before any pixel is decoded or reaches OpenCV."""
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{name}: image has no pixels ({width}x{height})")
    if max(width, height) > max_side:
        raise ImageLoadError(f"{name}: image too large: {width}x{height} px, limit {max_side} px per side")
    if width * height > max_pixels:
        raise ImageLoadError(f"{name}: image too large: {width}x{height} = {width * height} pixels exceeds "
                             f"the limit of {max_pixels}")


def load_image(source: ImageInput, max_pixels: int = 50_000_000, max_side: int = MAX_SIDE) -> np.ndarray:
    """Return the image as an upright RGB uint8 array of shape (H, W, 3).

    EXIF orientation is applied; grayscale, palette, RGBA (composited on white), 16-bit, CMYK and other
    modes are converted to RGB. ``max_pixels`` guards against decompression bombs, ``max_side`` against
    geometry that OpenCV cannot handle (see :func:`check_geometry`).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(source, np.ndarray):
        if source.ndim >= 2:
            check_geometry(f"<array {source.shape[1]}x{source.shape[0]}>", source.shape[1], source.shape[0],
                           max_pixels, max_side)
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        check_geometry(f"<{type(source).__name__} {source.width}x{source.height}>", source.width, source.height,
                       max_pixels, max_side)
        try:  # a PIL image is only decoded now: a truncated file, a closed image or an odd mode fails here
            return _pil_to_rgb(ImageOps.exif_transpose(source) or source)
        except ImageLoadError:
            raise
        except (OSError, ValueError, AssertionError, SyntaxError, TypeError) as e:
            raise ImageLoadError(f"<{type(source).__name__} {source.width}x{source.height} mode {source.mode}>: "
                                 f"cannot be read ({type(e).__name__}: {e or 'closed or damaged'})") from None
    if isinstance(source, (bytes, bytearray, memoryview)) and not _plausible_path(source):
        raise ImageLoadError(f"<{len(source)} bytes>: encoded image data, not a path; pass "
                             f"PIL.Image.open(io.BytesIO(data)) or the file's path")
    if not isinstance(source, (str, bytes, os.PathLike)):
        raise ImageLoadError(f"<{type(source).__name__}>: not an image (expected a path, a PIL image or an RGB "
                             f"array" + ("; for several images use analyze_many" if isinstance(source, (list, tuple))
                                         else "") + ")")
    name = os.fspath(source)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if (problem := url_problem(name)) is not None:
        raise ImageLoadError(problem)
    try:
        st = os.stat(name)
    except OSError as e:
        if e.errno == errno.ENOENT and os.path.lexists(name):
            raise ImageLoadError(f"{name}: broken symbolic link (its target does not exist)") from None
        raise ImageLoadError(f"{name}: {os_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(f"{name}: is a folder, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(f"{name}: not a regular file ({_file_kind(st.st_mode)})")
    if st.st_size == 0:
        raise ImageLoadError(f"{name}: empty file (0 bytes)")
    try:
        fh = open(name, "rb")  # noqa: SIM115 - closed below; opening first separates "cannot open" from "bad image"
    except OSError as e:
        raise ImageLoadError(f"{name}: {os_reason(e)} (the file cannot be opened)") from None
    try:
        with fh, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fh) as im:
                w, h = im.size
                check_geometry(name, w, h, max_pixels, max_side)
                im.load()
                upright = ImageOps.exif_transpose(im) or im
                return _pil_to_rgb(upright)
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(f"{name}: decompression bomb refused ({e})") from None
    except MemoryError:
        raise ImageLoadError(f"{name}: not enough memory to decode this image") from None
    except OSError as e:
        if e.errno is not None:  # a read error of the file system, not of the image data
            raise ImageLoadError(f"{name}: {os_reason(e)} (while reading the file)") from None
        raise ImageLoadError(f"{name}: corrupt or truncated image ({e})") from None
    except (SyntaxError, ValueError, EOFError, IndexError, struct.error) as e:
        raise ImageLoadError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from None



def _full_scale(peak: float) -> float:
    """The full-scale value of integer samples whose largest is ``peak``: the smallest 2**k - 1 (k >= 8) at or
    above it. 12-bit camera data in a 16-bit file (peak 4080) is then read at full brightness, not at 6 %, and
    one pixel at 256 in 8-bit values no longer darkens the image 257 times (to black: no face, no error)."""
    bits = max(8, int(np.ceil(np.log2(max(float(peak), 0.0) + 1.0))))
    return float(2 ** bits - 1)


def _pil_to_rgb(im: Any) -> np.ndarray:
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        g = np.clip(a / _full_scale(a.max()) * 255.0, 0, 255).astype(np.uint8)
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


def _plausible_path(data: bytes | bytearray | memoryview) -> bool:
    """Whether bytes are a file name (os.fsencode'd) rather than an encoded image (which has NUL bytes)."""
    return isinstance(data, bytes) and b"\0" not in data and len(data) < 4096


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype == bool:  # a 1-bit image as NumPy gives it (np.asarray of a mode "1" PIL image): white is True
        a = a.astype(np.uint8) * 255
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ImageLoadError(f"array of dtype {a.dtype} is not an image (expected integers or floats)")
    if np.issubdtype(a.dtype, np.floating) and a.size and not np.isfinite(a).all():
        raise ImageLoadError(f"array of shape {a.shape} has NaN or infinite pixel values")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageLoadError(f"array of shape {a.shape} is not an (H, W[, 1|3|4]) image")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    # the same rules as for files and PIL images (_pil_to_rgb), so one picture gives one result however it
    # is passed: 16-bit values are scaled from the bit depth they use (_full_scale), and transparent pixels
    # are composited on white (the alpha channel used to be dropped, so a transparent face was found in an
    # array and not in the same PIL image)
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.max() <= 1.0:
            a = a * 255.0
        elif a.dtype == np.uint16:
            a = a / _full_scale(a.max()) * 255.0
        a = np.clip(a, 0, 255)
    if a.shape[2] == 4:
        alpha = a[:, :, 3:4] / 255.0
        a = np.rint(a[:, :, :3] * alpha + 255.0 * (1.0 - alpha))
    return np.ascontiguousarray(a.astype(np.uint8))



@dataclass
class InputItem:
    """One input to process: its path as it will appear in the record, its context, manifest columns,
    and a problem already found while expanding the inputs (written as this input's error record)."""

    path: str
    context: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    found: bool = True  # False: nothing exists at this path (a typo?)
    row: str | None = None  # "manifest.csv:LINE" for a manifest row


@dataclass
class InputSet:
    """What a list of inputs expands to."""

    items: list[InputItem]
    notes: list[str] = field(default_factory=list)  # inputs that gave nothing: empty globs, folders without images
    duplicates: list[str] = field(default_factory=list)  # manifest rows skipped as exact repeats

    @property
    def nothing_found(self) -> bool:
        """True when no input named anything that exists: the arguments are unusable (exit status 2)."""
        return not any(it.found for it in self.items)

    def problem(self) -> str:
        """Why nothing was found: the first few reasons and how many more (400 missing files made one line of
        13 KB), or that no input was given at all."""
        reasons = self.notes + [f"{it.path}: file not found" for it in self.items if not it.found]
        if not reasons:
            return "no input given: name image files, folders, globs or CSV manifests"
        shown = "; ".join(reasons[:5])
        return f"no input found: {shown}" + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")


def _lexists(path: str) -> bool:
    """Whether something (a file, folder, link, even a broken one) is at ``path``; unknowable counts as yes,
    so that loading reports the real problem (e.g. permission denied) in that input's record."""
    try:
        os.lstat(path)
    except OSError as e:
        return e.errno not in (errno.ENOENT, errno.ENOTDIR)
    return True


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


# photos in formats cem does not read (Pillow has no decoder for them without plug-ins): a folder walk says
# how many it passed over instead of passing them over silently
UNREAD_PHOTO_EXTENSIONS = frozenset({".heic", ".heif", ".avif", ".jxl", ".cr2", ".cr3", ".nef", ".arw", ".dng",
                                     ".raw", ".orf", ".rw2", ".psd", ".svg"})


def _walk(folder: str, passed_over: dict[str, int] | None = None) -> list[InputItem]:
    """Image files under ``folder`` (recursive), sorted. Symbolic links to folders are followed (a data set
    of linked subsets was annotated without them, unsaid), each real folder once; a link to ``folder`` itself or
    to a folder above it is not (it would walk the folders beside the one named). A folder that cannot be
    listed, and anything with an image name that is a folder, become
    items carrying that error, so that they get a record instead of vanishing. ``passed_over`` counts, by
    extension, the videos and unreadable photo formats that were left out."""
    from cem.video import VIDEO_EXTENSIONS

    out: list[InputItem] = []
    stack = [folder]
    linked: list[str] = []  # folders reached through a link: walked after every real one, so a folder linked
    # from beside itself keeps its own name (records name it as an older cem, which did not follow links, did)
    seen: set[tuple[int, int]] = set()  # (device, inode) of the folders listed
    top = os.path.realpath(folder)
    while stack or linked:
        d = stack.pop() if stack else linked.pop()
        try:
            st = os.stat(d)
        except OSError:
            pass  # listing it below says what is wrong
        else:
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)  # a folder reached two ways: the same way each run
        except OSError as e:
            out.append(InputItem(d, error=f"{d}: {os_reason(e)} (a folder that cannot be listed)"))
            continue
        for entry in entries:
            image_name = _is_image_name(entry.name)
            try:
                is_dir = entry.is_dir()  # through a link too (a loop or a dangling link is no folder)
            except OSError:
                is_dir = False
            if is_dir and entry.is_symlink():
                target = os.path.realpath(entry.path)
                # a link up the tree (`parent -> ..`) would walk the folders beside the one named: not followed
                if not (top + os.sep).startswith(target.rstrip(os.sep) + os.sep):
                    linked.append(entry.path)
            elif is_dir:
                stack.append(entry.path)
                if image_name:
                    out.append(InputItem(entry.path, error=f"{entry.path}: is a folder, not an image"))
            elif image_name:  # regular files, links (even looping ones) and special files: loading judges them
                out.append(InputItem(entry.path))
            elif passed_over is not None:
                ext = os.path.splitext(entry.name)[1].lower()
                if ext in VIDEO_EXTENSIONS or ext in UNREAD_PHOTO_EXTENSIONS:
                    passed_over[ext] = passed_over.get(ext, 0) + 1
    out.sort(key=lambda it: Path(it.path).parts)
    return out


def _passed_over_text(counts: dict[str, int]) -> str:
    from cem.video import VIDEO_EXTENSIONS

    def listed(exts: list[str]) -> str:
        return ", ".join(f"{counts[e]} {e}" for e in sorted(exts))

    parts = []
    videos = [e for e in counts if e in VIDEO_EXTENSIONS]
    photos = [e for e in counts if e not in VIDEO_EXTENSIONS]
    if videos:
        parts.append(f"left out {listed(videos)} video file(s) (a folder gives its images; name a video as an "
                     f"input to annotate it)")
    if photos:
        parts.append(f"left out {listed(photos)} photo(s) in formats cem does not read (convert them to JPEG or "
                     f"PNG)")
    return "; ".join(parts)


def _expand_one(s: str, out: list[InputItem], notes: list[str]) -> None:
    if not s:
        notes.append("an empty input name was given and ignored")
        return
    if _lexists(s):
        if _is_dir(s):
            passed_over: dict[str, int] = {}
            found = _walk(s, passed_over)
            if not found:
                notes.append(f"{s}: no image files in this folder")
            if passed_over:
                notes.append(f"{s}: {_passed_over_text(passed_over)}")
            out.extend(found)
        else:
            out.append(InputItem(s))
    elif glob.has_magic(s):
        matches = sorted(glob.glob(s, recursive=True))
        if not matches:
            notes.append(f"{s}: no file matches this pattern")
        for m in matches:
            if _is_dir(m):
                if _is_image_name(m):
                    out.append(InputItem(m, error=f"{m}: is a folder, not an image"))
                out.extend(_walk(m))
            else:
                out.append(InputItem(m))
    else:
        out.append(InputItem(s, found=False))


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Files, folders (recursive, image extensions only, sorted) and globs -> paths as given, each once.

    A file named explicitly is kept whatever its extension (so that a bad file gets an error record);
    a name that matches nothing is kept too, and fails at load time with "file not found".
    """
    return [it.path for it in collect_inputs(inputs).items]


def _csv_rows(path: str | os.PathLike, required: set[str]) -> list[tuple[int, dict[str, str], str | None]]:
    """(line number, row, the row's problem or None) of a UTF-8 CSV (a byte-order mark, as Excel writes, is
    accepted); header names are stripped of spaces. A row with cells beyond the header has a problem; problems
    with the file as a whole raise :class:`InputError`.

    Contexts can be long, so fields up to :data:`CSV_FIELD_LIMIT` are read. The csv module's limit is one
    setting for the whole process, so it is raised only while this file is read and then put back: a user's
    own csv code (and ``cem eval``'s label reader) keeps the limit it had.
    """
    import csv

    before = csv.field_size_limit()
    csv.field_size_limit(max(before, CSV_FIELD_LIMIT))
    try:
        return list(_read_csv_rows(path, required))
    finally:
        csv.field_size_limit(before)


def _read_csv_rows(path: str | os.PathLike, required: set[str]) -> Iterator[tuple[int, dict[str, str], str | None]]:
    import csv

    try:
        fh = open(path, newline="", encoding="utf-8-sig")  # noqa: SIM115 - closed below
    except OSError as e:
        raise InputError(f"{path}: cannot open ({os_reason(e)})") from None
    with fh:
        reader = csv.reader(fh)
        try:
            # the columns cem reads are matched whatever their case ("Image", "Subject"); others are kept as typed
            header = [h.strip().lower() if h.strip().lower() in MANIFEST_COLUMNS else h.strip()
                      for h in next(reader, [])]
            repeated = sorted({h for h in header if h and header.count(h) > 1})
            if repeated:  # which of two 'image' columns is meant cannot be guessed
                raise InputError(f"{path}: the header names column(s) {', '.join(map(repr, repeated))} more than "
                                 f"once; the header is {header}")
            missing = sorted(required - set(header))
            if missing:
                need = ", ".join(repr(m) for m in sorted(required))
                joined = ",".join(header)
                hint = next((f" (it looks separated by {sep!r}: save it comma-separated, as CSV)"
                             for sep in (";", "\t", "|") if sep in joined), "")
                raise InputError(f"{path}: needs the column(s) {need}; the header is {header}{hint}")
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                cells = dict(zip(header, row))
                # cells without a column would be dropped unseen: the row's record says so instead
                problem = (f"{len(row)} cells, but the header has {len(header)} columns"
                           if any(c.strip() for c in row[len(header):]) else None)
                unnamed = [i + 1 for i, (h, c) in enumerate(zip(header, row)) if not h and c.strip()]
                if unnamed and problem is None:  # the same for a value under a header cell left empty
                    problem = (f"a value in column {unnamed[0]}, whose header cell is empty (name the column, or "
                               f"leave its cells empty)")
                yield reader.line_num, {k: cells.get(k, "") for k in header if k}, problem
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as \"CSV UTF-8\" "
                             f"(a spreadsheet's default may be Windows-1252 or Latin-1)") from None
        except csv.Error as e:
            raise InputError(f"{path}:{reader.line_num}: {e} (fields are limited to {CSV_FIELD_LIMIT} bytes)") from None


# manifest columns with a meaning for cem (any other column is carried under the record's `meta`): the image,
# its context, and for subject baselines the person in the photo and whether it is their neutral photo
SUBJECT_COLUMN, NEUTRAL_COLUMN = "subject", "neutral"
MANIFEST_COLUMNS = frozenset({"image", "context", SUBJECT_COLUMN, NEUTRAL_COLUMN})


def _context_problem(context: Any, where: str) -> str | None:
    if context is not None and not isinstance(context, str):
        return f"context in {where} is {type(context).__name__}, not text"
    if context is not None and len(context) > MAX_CONTEXT_CHARS:
        return f"context in {where} has {len(context)} characters, more than the limit of {MAX_CONTEXT_CHARS}"
    return None


def read_manifest(path: str | os.PathLike) -> list[InputItem]:
    """A CSV manifest: column ``image`` (relative paths are relative to the manifest's folder), optional
    ``context``, and any other columns, which are carried into the output records (under ``meta``).
    A row with no image or an over-long context becomes an item carrying that error."""
    base = Path(path).parent
    items = []
    for n, row, row_problem in _csv_rows(path, {"image"}):
        img = row.get("image", "").strip()
        where = f"{os.fspath(path)}:{n}"
        extra = {k: v for k, v in row.items() if k not in ("image", "context")}
        if not img:
            items.append(InputItem(where, extra=extra, error=f"{where}: empty 'image' cell", row=where))
            continue
        p = img if os.path.isabs(img) else str(base / img)
        context = row.get("context") or None
        problem = f"{where}: {row_problem}" if row_problem else _context_problem(context, where)
        if not problem and not _lexists(p) and not os.path.isabs(img) and _lexists(img) and base != Path("."):
            # the most common manifest mistake: paths written relative to where the command runs
            problem = (f"{where}: file not found; relative paths in a manifest are relative to its folder "
                       f"({base}), and {img} exists relative to the current folder: write it relative to the "
                       f"manifest, or as an absolute path")
        items.append(InputItem(p, None if problem else context, extra, error=f"{p}: {problem}" if problem else None,
                               found=_lexists(p), row=where))
    return items


@dataclass
class ContextTable:
    """An ``image,context`` file: contexts by image (path as given or file name), and per-image problems."""

    contexts: dict[str, str]
    errors: dict[str, str]

    def lookup(self, path: str) -> tuple[str | None, str | None]:
        """(context, error) for an image path: by the path as given, else by its file name."""
        for key in (path, Path(path).name):
            if key in self.errors:
                return None, self.errors[key]
            if key in self.contexts:
                return self.contexts[key] or None, None  # an empty cell: no context of its own
        return None, None


def read_context_csv(path: str | os.PathLike) -> ContextTable:
    """``image,context`` CSV. One image given two different contexts is an :class:`InputError` (which one
    was meant cannot be known); an over-long context is an error for that image only."""
    contexts: dict[str, str] = {}
    errors: dict[str, str] = {}
    lines: dict[str, int] = {}
    for n, row, row_problem in _csv_rows(path, {"image", "context"}):
        img, ctx = row["image"].strip(), row.get("context", "")
        if row_problem:
            errors[img] = f"{os.fspath(path)}:{n}: {row_problem}"
            continue
        if img in lines and contexts.get(img) != ctx:
            raise InputError(f"{path}: lines {lines[img]} and {n} give two different contexts for {img!r}")
        lines[img] = n
        problem = _context_problem(ctx, f"{os.fspath(path)}:{n}")
        if problem:
            errors[img] = problem
        else:
            contexts[img] = ctx
    return ContextTable(contexts, errors)


def collect_inputs(inputs: Iterable[str | os.PathLike], contexts: ContextTable | Mapping[str, str] | None = None,
                   context: str | None = None) -> InputSet:
    """Expand inputs: files, folders (recursive), globs, and CSV manifests (``.csv`` files), each path in its
    normal spelling (:func:`_normal_path`: ``./a//b.jpg`` is ``a/b.jpg``, ``..`` is kept). Each item's
    context is the manifest's, else the context file's (by path, then file name), else ``context``.
    Items are unique by (path, context, the manifest's other columns): a repeated manifest row is skipped and
    reported, so two rows for one image with different contexts (or subjects) stay two records; an image
    named plainly (a file, a folder) and in a manifest row is the manifest row."""
    items: list[InputItem] = []
    notes: list[str] = []
    for i in inputs:
        s = os.fsdecode(i) if isinstance(i, bytes) else os.fspath(i)
        if s.lower().endswith(".csv") and os.path.isfile(s):
            rows = read_manifest(s)
            if not rows:
                notes.append(f"{s}: the manifest has no rows")
            elif NEUTRAL_COLUMN in rows[0].extra and SUBJECT_COLUMN not in rows[0].extra:
                notes.append(f"{s}: column {NEUTRAL_COLUMN!r} has no effect without a {SUBJECT_COLUMN!r} column "
                             f"(whose neutral photo?); it is carried under meta")
            items.extend(rows)
        else:
            _expand_one(s, items, notes)
    for it in items:  # one spelling per file: `set40/`, `./set40/x.jpg` and `set40//x.jpg` name one input
        it.path = _normal_path(it.path)
    problem = _context_problem(context, "--context")
    if problem:
        raise InputError(problem)
    if isinstance(contexts, ContextTable):
        table = contexts
    else:  # a mapping from Python: checked as a context file's rows are (an over-long one is that image's error)
        given = dict(contexts or {})
        errors = {k: p for k, v in given.items() if (p := _context_problem(v, f"contexts[{k!r}]")) is not None}
        table = ContextTable({k: v for k, v in given.items() if k not in errors}, errors)
    table = ContextTable({_normal_path(k): v for k, v in table.contexts.items()},  # as the inputs are spelled
                         {_normal_path(k): v for k, v in table.errors.items()})
    by_name: dict[str, dict[Any, str]] = {}  # a row keyed by a file name -> the files it would be applied to
    for it in items:
        if it.context is None and it.error is None and it.path not in table.contexts and it.path not in table.errors:
            name = Path(it.path).name
            if name in table.contexts or name in table.errors:
                by_name.setdefault(name, {}).setdefault(same_file(it.path), it.path)
    shared = {name: files for name, files in by_name.items() if len(files) > 1}
    if shared:  # which image the row meant cannot be known: a funeral's context on a party photo is worse than none
        name, files = next(iter(shared.items()))
        paths = list(files.values())
        raise InputError(f"the context row for {name!r} names a file name that {len(paths)} inputs share "
                         f"({', '.join(sorted(paths)[:3])}{', ...' if len(paths) > 3 else ''}); give each its path "
                         f"in the context file")
    for it in items:
        if it.context is None and it.error is None:
            ctx, err = table.lookup(it.path)
            it.context = ctx if ctx is not None else context
            if err:
                it.error = f"{it.path}: {err}"
    named = {key for it in items for key in (it.path, Path(it.path).name)}
    unmatched = [k for k in (*table.contexts, *table.errors) if k not in named]
    if unmatched:  # a typo in the context file would otherwise leave its image without context, unseen
        notes.append(f"{len(unmatched)} context row(s) match no input (first: {unmatched[0]!r}); they are not used")
    unique: list[InputItem] = []
    seen: dict[tuple[str, str | None], list[int]] = {}  # (path, context) -> positions in unique
    duplicates = []
    merged: set[str] = set()
    for it in items:
        key = (it.path, it.context)  # in its normal spelling since the expansion: the key path_key gives
        earlier = seen.setdefault(key, [])
        same = [j for j in earlier if unique[j].extra == it.extra]
        if same:
            if it.row:  # a repeated manifest row is reported; a path named twice is just one input
                first = unique[same[0]].row or "the command line"
                duplicates.append(f"{it.row}: {it.path} repeats {first} with the same context and columns; skipped")
            continue
        plain = [j for j in earlier if not unique[j].extra]
        if plain and it.extra:  # a manifest row for an image also named plainly (a folder): the row says more
            unique[plain[0]] = it
            merged.add(it.path)
            continue
        if earlier and not it.extra:  # named plainly after a manifest row for it: that row covers it
            merged.add(it.path)
            continue
        earlier.append(len(unique))  # rows that differ in other columns (two subjects) are two inputs
        unique.append(it)
    if merged:
        notes.append(f"{len(merged)} image(s) named both plainly (a file or folder) and in a manifest row with the "
                     f"same context: one record each, with the row's columns")
    return InputSet(unique, notes, duplicates)
