"""Calibration and evaluation data: model inputs streamed one sample at a time.

Three kinds of source feed a model, each checked against the model's inputs (:class:`InputSpec`)
as it streams:

- an ``.npz`` (one array per model input, keyed by input name, samples first) or an ``.npy``
  (single-input models), read from disk one sample at a time, never whole;
- a folder of images (or one image file) with a declared :class:`Preprocess`, decoded one image at
  a time;
- any iterable of ``{input_name: array}`` dicts, one sample each.

:class:`CalibrationSet` turns any of them into a re-iterable of ``{name: array}`` dicts whose arrays
have exactly the input's shape and dtype. ``limit`` and ``offset`` select a window of samples so
that calibration and evaluation can take disjoint parts of the same source.

Image preprocessing follows the common reference pipelines: torchvision's ``Resize(resize)`` +
``CenterCrop(size)`` (bilinear), or YOLOX's letterbox (scale to fit, pad bottom/right), then
``(x - mean) / std`` on 0..255 pixel values.
"""

from __future__ import annotations

import operator
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sized
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction
from itertools import islice
from math import floor, isfinite, prod
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from qcompiler.passes.errors import QCompilerError

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
LAYOUTS = ("NCHW", "NHWC")
CHANNELS = {"RGB": 3, "BGR": 3, "GRAY": 1}
PREPROCESS_KEYS = ("size", "resize", "mean", "std", "layout", "channels", "letterbox", "pad_value")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class InputSpec:
    """What one model input looks like.

    Parameters
    ----------
    name : str
        The input's name in the model.
    shape : tuple of int
        Static shape including the batch axis, e.g. ``(1, 3, 224, 224)``.
    dtype : str
        Numeric numpy dtype name, e.g. ``"float32"`` or ``"uint8"`` (normalised to numpy's name).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise QCompilerError(f"InputSpec.name must be a non-empty string, got {self.name!r}")
        try:
            shape = tuple(operator.index(dim) for dim in self.shape)
        except TypeError as err:
            raise QCompilerError(
                f"input {self.name!r}: shape must be a tuple of ints, got {self.shape!r}"
            ) from err
        if any(dim <= 0 for dim in shape):
            raise QCompilerError(
                f"input {self.name!r}: shape {shape} must have positive dimensions "
                "(fix dynamic dimensions before calibrating)"
            )
        try:
            # np.dtype(None) silently means float64.
            dtype = np.dtype(self.dtype) if self.dtype is not None else None
        except TypeError as err:
            raise QCompilerError(f"input {self.name!r}: unknown dtype {self.dtype!r}") from err
        if dtype is None or dtype.kind not in "biuf":
            raise QCompilerError(
                f"input {self.name!r}: dtype {self.dtype!r} is not numeric; "
                "expected e.g. float32, int8 or uint8"
            )
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", dtype.name)


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a model input.

    Steps: decode (RGB, or luma for GRAY); fit to the input's height x width (see ``resize`` and
    ``letterbox``); swap to BGR if asked; ``(x - mean) / std`` on 0..255 values; transpose to
    ``layout``; add the batch axis; cast to the input's dtype (integer inputs are rounded and must
    fit the dtype's range).

    Parameters
    ----------
    size : tuple of int, optional
        ``(height, width)`` of the model input; None takes it from the InputSpec. When given it must
        agree with the InputSpec, so a mismatched model is caught early.
    resize : int, optional
        Resize the shorter side to this (keeping the aspect ratio), then centre-crop ``size``
        (torchvision ``Resize`` + ``CenterCrop``). None resizes straight to ``size``.
    mean, std : tuple of float
        Per channel, in the model's channel order (after the BGR swap). One value applies to every
        channel.
    layout : {"NCHW", "NHWC"}
    channels : {"RGB", "BGR", "GRAY"}
    letterbox : bool
        YOLOX style: scale to fit keeping the aspect ratio, place top-left, pad bottom/right with
        ``pad_value``. Excludes ``resize``.
    pad_value : float
        Padding in 0..255 pixel units, before ``mean``/``std``.
    """

    size: tuple[int, int] | None = None
    resize: int | None = None
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    layout: str = "NCHW"
    channels: str = "RGB"
    letterbox: bool = False
    pad_value: float = 114.0

    def __post_init__(self):
        layout = str(self.layout).upper()
        if layout not in LAYOUTS:
            raise QCompilerError(f"Preprocess.layout {self.layout!r} is not one of {LAYOUTS}")
        channels = str(self.channels).upper()
        if channels not in CHANNELS:
            raise QCompilerError(
                f"Preprocess.channels {self.channels!r} is not one of {tuple(CHANNELS)}"
            )
        size = self.size
        if size is not None:
            size = tuple(size) if isinstance(size, (tuple, list)) else (size,)
            if len(size) != 2 or not all(_is_int(dim) and dim > 0 for dim in size):
                raise QCompilerError(
                    f"Preprocess.size must be (height, width) in positive ints, got {self.size!r}"
                )
            size = (int(size[0]), int(size[1]))
        if self.resize is not None and not (_is_int(self.resize) and self.resize > 0):
            raise QCompilerError(
                f"Preprocess.resize must be a positive int or None, got {self.resize!r}"
            )
        if not isinstance(self.letterbox, (bool, np.bool_)):
            raise QCompilerError(f"Preprocess.letterbox must be a bool, got {self.letterbox!r}")
        if self.letterbox and self.resize is not None:
            raise QCompilerError(
                f"Preprocess: letterbox scales to fit, resize={self.resize} resizes then crops; "
                "choose one"
            )
        mean = _per_channel("mean", self.mean, channels)
        std = _per_channel("std", self.std, channels)
        if 0.0 in std:
            raise QCompilerError(f"Preprocess.std {std} has a zero")
        try:
            pad_value = float(self.pad_value)
        except (TypeError, ValueError) as err:
            raise QCompilerError(
                f"Preprocess.pad_value {self.pad_value!r} is not a number"
            ) from err
        if not isfinite(pad_value):
            raise QCompilerError(f"Preprocess.pad_value must be finite, got {pad_value}")
        for name, value in (
            ("size", size),
            ("mean", mean),
            ("std", std),
            ("layout", layout),
            ("channels", channels),
            ("letterbox", bool(self.letterbox)),
            ("pad_value", pad_value),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def parse(cls, text: str) -> Preprocess:
        """Read the CLI form, e.g. ``"resize=256,size=224x224,mean=127,std=128,layout=NCHW"``.

        ``size`` is ``HxW`` (or one number for a square). Per-channel ``mean``/``std`` continue
        after commas (``mean=123.675,116.28,103.53``); one value applies to every channel.
        ``letterbox`` alone means ``letterbox=true``. Keys are the fields of :class:`Preprocess`.
        """
        raw: dict[str, list[str]] = {}
        last = None
        for token in (part.strip() for part in text.split(",")):
            if not token:
                continue
            key, sep, value = (part.strip() for part in token.partition("="))
            key = key.lower()
            if not sep and key == "letterbox":
                value = "true"
            elif not sep and last in ("mean", "std"):
                raw[last].append(token)
                continue
            elif not sep:
                raise QCompilerError(f"preprocessing item {token!r} in {text!r} is not key=value")
            if key not in PREPROCESS_KEYS:
                raise QCompilerError(
                    f"unknown preprocessing key {key!r} in {text!r}; "
                    f"valid keys: {', '.join(PREPROCESS_KEYS)}"
                )
            if key in raw:
                raise QCompilerError(f"preprocessing key {key!r} given twice in {text!r}")
            raw[key] = [value]
            last = key
        fields = {}
        for key, values in raw.items():
            try:
                fields[key] = _parse_value(key, values)
            except ValueError as err:
                raise QCompilerError(
                    f"preprocessing {key}={','.join(values)!r} in {text!r}: {err}"
                ) from err
        return cls(**fields)


def _parse_value(key: str, values: list[str]):
    value = values[0]
    if key == "size":
        dims = value.lower().split("x")
        if len(dims) > 2:
            raise ValueError("expected HxW or one number")
        return (int(dims[0]), int(dims[-1]))
    if key == "resize":
        return int(value)
    if key in ("mean", "std"):
        return tuple(float(v) for v in values)
    if key == "pad_value":
        return float(value)
    if key == "letterbox":
        if value.lower() not in _TRUE + _FALSE:
            raise ValueError(f"expected one of {_TRUE + _FALSE}")
        return value.lower() in _TRUE
    return value


def _per_channel(name: str, values, channels: str) -> tuple[float, ...]:
    count = CHANNELS[channels]
    try:
        values = tuple(float(v) for v in np.atleast_1d(values))
    except (TypeError, ValueError) as err:
        raise QCompilerError(f"Preprocess.{name} {values!r} is not numbers") from err
    if not all(isfinite(v) for v in values):
        raise QCompilerError(f"Preprocess.{name} {values} must be finite")
    if len(values) == 1:
        return values * count
    if len(values) == count:
        return values
    # The RGB defaults (0, 0, 0) / (1, 1, 1) must stay valid for GRAY: equal values mean one value.
    if count == 1 and len(set(values)) == 1:
        return values[:1]
    raise QCompilerError(
        f"Preprocess.{name} {values} has {len(values)} values but channels={channels} has "
        f"{count}; give 1 or {count}"
    )


def _image_geometry(spec: InputSpec, pre: Preprocess) -> tuple[int, int]:
    """Check that images preprocessed by ``pre`` can feed ``spec``; return its (height, width)."""
    if len(spec.shape) != 4 or spec.shape[0] != 1:
        raise QCompilerError(
            f"input {spec.name!r} has shape {spec.shape}; images feed rank-4 inputs with batch 1 "
            "([1, C, H, W] or [1, H, W, C])"
        )
    if pre.layout == "NCHW":
        channels, height, width = spec.shape[1:]
    else:
        height, width, channels = spec.shape[1:]
    if channels != CHANNELS[pre.channels]:
        raise QCompilerError(
            f"input {spec.name!r} of shape {spec.shape} has {channels} channels in {pre.layout} "
            f"layout, but channels={pre.channels} gives {CHANNELS[pre.channels]}; "
            "check layout and channels"
        )
    if pre.size is not None and pre.size != (height, width):
        raise QCompilerError(
            f"preprocessing size {pre.size[0]}x{pre.size[1]} differs from input {spec.name!r} "
            f"of shape {spec.shape}, which is {height}x{width} (HxW) in {pre.layout} layout"
        )
    if spec.dtype == "bool":
        raise QCompilerError(f"input {spec.name!r} is bool; images cannot feed it")
    return height, width


def _pixels(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image, dtype=np.float32)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def _fit(image: Image.Image, height: int, width: int, pre: Preprocess, path: Path) -> np.ndarray:
    """Bring a decoded image to height x width as float32 HWC pixels in 0..255."""
    if pre.letterbox:
        # Exact arithmetic: a float scale can land a hair under an integer and lose a pixel.
        scale = min(Fraction(height, image.height), Fraction(width, image.width))
        fit_w, fit_h = max(1, floor(image.width * scale)), max(1, floor(image.height * scale))
        canvas = np.full((height, width, CHANNELS[pre.channels]), pre.pad_value, np.float32)
        canvas[:fit_h, :fit_w] = _pixels(image.resize((fit_w, fit_h), Image.Resampling.BILINEAR))
        return canvas
    if pre.resize is not None:
        short = min(image.size)
        resized = (pre.resize * image.width // short, pre.resize * image.height // short)
        image = image.resize(resized, Image.Resampling.BILINEAR)
        if image.height < height or image.width < width:
            raise QCompilerError(
                f"image {path} is {image.height}x{image.width} after resize={pre.resize}, "
                f"too small to crop {height}x{width}; raise resize"
            )
        top, left = round((image.height - height) / 2), round((image.width - width) / 2)
        image = image.crop((left, top, left + width, top + height))
    elif image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return _pixels(image)


def image_sample(path: str | os.PathLike, spec: InputSpec, pre: Preprocess) -> np.ndarray:
    """Decode and preprocess one image into a model input.

    Parameters
    ----------
    path : str or path-like
        Any image Pillow decodes.
    spec : InputSpec
        The rank-4, batch-1 input it feeds.
    pre : Preprocess
        How to get there.

    Returns
    -------
    numpy.ndarray
        Shaped ``spec.shape``, of ``spec.dtype``.
    """
    height, width = _image_geometry(spec, pre)
    path = Path(path)
    try:
        with Image.open(path) as image:
            decoded = image.convert("L" if pre.channels == "GRAY" else "RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise QCompilerError(f"cannot decode image {path}: {err}") from err
    pixels = _fit(decoded, height, width, pre, path)
    if pre.channels == "BGR":
        pixels = pixels[:, :, ::-1]
    pixels = (pixels - np.float32(pre.mean)) / np.float32(pre.std)
    if pre.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    if np.dtype(spec.dtype).kind in "iu":
        pixels = np.rint(pixels)
    return _conform(pixels[None], spec, f"image {path}")


def _check_kind(dtype: np.dtype, spec: InputSpec, where: str) -> None:
    accepted = "b" if spec.dtype == "bool" else "biuf"
    if dtype.kind not in accepted:
        raise QCompilerError(
            f"input {spec.name!r} ({where}): dtype {dtype} cannot feed a {spec.dtype} input"
        )


def _conform(value, spec: InputSpec, where: str) -> np.ndarray:
    """One sample for ``spec``, checked and converted to its exact shape and dtype.

    Integer data for a float input is cast (uint8 images for float models); float data for an
    integer input must hold integers within the dtype's range, so nothing is silently rounded.
    """
    array = np.asarray(value)
    if array.shape != spec.shape:
        if spec.shape[:1] == (1,) and array.shape == spec.shape[1:]:
            array = array[None]
        else:
            raise QCompilerError(
                f"input {spec.name!r} ({where}): expected shape {spec.shape}, got {array.shape}"
            )
    _check_kind(array.dtype, spec, where)
    target = np.dtype(spec.dtype)
    if target.kind in "iu":
        if array.dtype.kind == "f":
            if not np.isfinite(array).all():
                raise QCompilerError(f"input {spec.name!r} ({where}): contains NaN or Inf")
            if not np.array_equal(array, np.rint(array)):
                raise QCompilerError(
                    f"input {spec.name!r} ({where}): {spec.dtype} input given non-integer values"
                )
        info = np.iinfo(target)
        if not np.can_cast(array.dtype, target) and (
            array.min() < info.min or array.max() > info.max
        ):
            raise QCompilerError(
                f"input {spec.name!r} ({where}): values span [{array.min()}, {array.max()}], "
                f"outside {spec.dtype} [{info.min}, {info.max}]"
            )
    converted = np.ascontiguousarray(array, dtype=target)
    if target.kind == "f" and not np.isfinite(converted).all():
        raise QCompilerError(
            f"input {spec.name!r} ({where}): contains NaN or Inf (as {spec.dtype})"
        )
    return converted


def _image_files(folder: Path) -> list[Path]:
    """The images directly in ``folder``, sorted by file name."""
    try:
        images = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    except OSError as err:
        raise QCompilerError(f"cannot list image folder {folder}: {err}") from err
    if not images:
        raise QCompilerError(
            f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}; "
            "subfolders are not searched)"
        )
    return sorted(images, key=lambda p: p.name)


def _read_header(stream: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Read an .npy header (shape, fortran_order, dtype), leaving ``stream`` at the data."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


class _ArrayReader:
    """An .npz or .npy read one sample at a time: headers when opened, slices while iterating.

    Samples are read straight from the (possibly deflated) zip member stream, so even a
    ``savez_compressed`` file never sits in memory whole.
    """

    def __init__(self, path: Path, inputs: tuple[InputSpec, ...]):
        self.name = str(path)
        self._path = path
        self._inputs = inputs
        if path.suffix.lower() == ".npy" and len(inputs) != 1:
            raise QCompilerError(
                f"{path} is an .npy (one array) but the model has inputs "
                f"{[s.name for s in inputs]}; use an .npz keyed by input name"
            )
        try:
            with ExitStack() as stack:
                headers = {key: _read_header(s) for key, s in self._open(stack, None).items()}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise QCompilerError(f"cannot read calibration file {path}: {err}") from err
        names = [spec.name for spec in inputs]
        missing = [name for name in names if name not in headers]
        if missing:
            raise QCompilerError(
                f"{path} has no array for model input(s) {missing}; it holds {sorted(headers)}"
            )
        extra = sorted(set(headers) - set(names))
        if extra:
            raise QCompilerError(
                f"{path} holds arrays {extra} that are not model inputs {names}; "
                "is it the right file?"
            )
        self._layouts = {}
        for spec in inputs:
            shape, fortran_order, dtype = headers[spec.name]
            where = f"in {path}"
            _check_kind(dtype, spec, where)
            if fortran_order:
                raise QCompilerError(
                    f"input {spec.name!r} ({where}) is stored in Fortran order, whose samples "
                    "cannot be read one at a time; save np.ascontiguousarray(...) instead"
                )
            self._layouts[spec.name] = (dtype, _sample_shape(spec, shape, where))
        counts = {name: headers[name][0][0] for name in names}
        if len(set(counts.values())) > 1:
            raise QCompilerError(f"{path}: model inputs have different sample counts {counts}")
        self.count = counts[names[0]]

    def _open(self, stack: ExitStack, names: list[str] | None) -> dict[str, BinaryIO]:
        """A stream per array, at its .npy magic (every array when ``names`` is None)."""
        if self._path.suffix.lower() == ".npy":
            return {self._inputs[0].name: stack.enter_context(self._path.open("rb"))}
        archive = stack.enter_context(zipfile.ZipFile(self._path))
        members = [m[: -len(".npy")] for m in archive.namelist() if m.endswith(".npy")]
        return {
            key: stack.enter_context(archive.open(f"{key}.npy"))
            for key in (members if names is None else names)
        }

    def read(self, start: int, stop: int | None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        stop = self.count if stop is None else min(stop, self.count)
        try:
            with ExitStack() as stack:
                streams = self._open(stack, [spec.name for spec in self._inputs])
                for name, stream in streams.items():
                    _read_header(stream)
                    dtype, shape = self._layouts[name]
                    stream.seek(start * dtype.itemsize * prod(shape), os.SEEK_CUR)
                for index in range(start, stop):
                    yield (
                        index,
                        {
                            name: self._sample(stream, *self._layouts[name])
                            for name, stream in streams.items()
                        },
                    )
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise QCompilerError(f"cannot read calibration file {self._path}: {err}") from err

    def _sample(self, stream: BinaryIO, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        buffer = bytearray(dtype.itemsize * prod(shape))
        if stream.readinto(buffer) != len(buffer):
            raise QCompilerError(f"calibration file {self._path} ends early; is it truncated?")
        return np.frombuffer(buffer, dtype).reshape(shape)


def _sample_shape(spec: InputSpec, stacked: tuple[int, ...], where: str) -> tuple[int, ...]:
    """One stored sample's shape: from ``[N, *spec.shape]`` or, for batch 1, ``[N, *shape[1:]]``."""
    batch_one = spec.shape[:1] == (1,)
    if stacked and (stacked[1:] == spec.shape or (batch_one and stacked[1:] == spec.shape[1:])):
        return stacked[1:]
    forms = [f"[N, {', '.join(map(str, spec.shape))}]"]
    if batch_one:
        forms.append(f"[N, {', '.join(map(str, spec.shape[1:]))}]")
    raise QCompilerError(
        f"input {spec.name!r} ({where}): expected shape {' or '.join(forms)} (samples first), "
        f"got {list(stacked)}"
    )


class _ImageReader:
    """A folder of images (or one image file), decoded and preprocessed one at a time."""

    def __init__(self, path: Path, inputs: tuple[InputSpec, ...], pre: Preprocess | None):
        self.name = f"image folder {path}" if path.is_dir() else f"image {path}"
        if pre is None:
            raise QCompilerError(
                f"{self.name} needs a preprocessing, e.g. Preprocess.parse("
                "'resize=256,size=224x224,mean=127,std=128')"
            )
        if len(inputs) != 1:
            raise QCompilerError(
                f"{self.name} feeds one input, the model has {[s.name for s in inputs]}"
            )
        _image_geometry(inputs[0], pre)
        self._spec, self._pre = inputs[0], pre
        self._paths = _image_files(path) if path.is_dir() else [path]
        self.count = len(self._paths)

    def read(self, start: int, stop: int | None) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for index, path in enumerate(self._paths[start:stop], start):
            yield index, {self._spec.name: image_sample(path, self._spec, self._pre)}


class _IterableReader:
    """User-supplied dicts, checked for the right keys as they stream."""

    name = "the calibration iterable"

    def __init__(self, source: Iterable, inputs: tuple[InputSpec, ...]):
        self._source = source
        self._names = [spec.name for spec in inputs]
        self.count = len(source) if isinstance(source, Sized) else None
        # A generator runs dry after one pass while calibration may need several.
        self._one_shot = isinstance(source, Iterator)
        self._used = False

    def read(self, start: int, stop: int | None) -> Iterator[tuple[int, Mapping]]:
        if self._one_shot and self._used:
            raise QCompilerError(
                "the calibration data is a one-shot iterator (e.g. a generator) and was already "
                "used; pass a list or another re-iterable object"
            )
        self._used = True
        for index, sample in enumerate(islice(self._source, start, stop), start):
            if not isinstance(sample, Mapping):
                raise QCompilerError(
                    f"sample {index} of {self.name} is a {type(sample).__name__}, "
                    "expected a dict {input_name: array}"
                )
            missing = [name for name in self._names if name not in sample]
            extra = sorted(set(sample) - set(self._names), key=str)
            if missing or extra:
                raise QCompilerError(
                    f"sample {index} of {self.name} has keys {sorted(sample, key=str)}; "
                    f"missing model input(s) {missing}, extra keys {extra}"
                )
            yield index, sample


def _refuse_preprocess(pre: Preprocess | None, what: str) -> None:
    if pre is not None:
        raise QCompilerError(
            f"a preprocessing applies to images only, not to {what}; "
            "arrays must already be shaped like the model inputs"
        )


def _reader(source, inputs: tuple[InputSpec, ...], pre: Preprocess | None):
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise QCompilerError(f"calibration data {path} does not exist")
        if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
            return _ImageReader(path, inputs, pre)
        if path.suffix.lower() not in (".npz", ".npy"):
            raise QCompilerError(
                f"calibration data {path} is not an .npz, an .npy, an image or a folder of images"
            )
        _refuse_preprocess(pre, str(path))
        return _ArrayReader(path, inputs)
    _refuse_preprocess(pre, "an iterable of dicts")
    if isinstance(source, Mapping):
        raise QCompilerError(
            "calibration data is one dict; pass an iterable of dicts, e.g. [sample]"
        )
    if isinstance(source, Iterable):
        return _IterableReader(source, inputs)
    raise QCompilerError(
        f"calibration data must be a path or an iterable of dicts, got {type(source).__name__}"
    )


class CalibrationSet:
    """Model inputs from a file, an image folder or an iterable, checked as they stream.

    Iterating yields one ``{input_name: array}`` dict per sample, arrays shaped and typed exactly
    like the InputSpecs; it can be iterated again (except over a one-shot iterator). Problems
    raise QCompilerError naming the file, input and sample index.

    Parameters
    ----------
    source : str, path-like or iterable of dict
        ``.npz`` / ``.npy`` file, image folder or image file, or dicts of arrays, one per sample.
    inputs : list of InputSpec
        The model inputs the samples must feed.
    preprocess : Preprocess, optional
        Required for images, refused for anything else.
    limit : int, optional
        At most this many samples.
    offset : int
        Skip this many samples first.
    """

    def __init__(
        self,
        source,
        inputs: list[InputSpec],
        preprocess: Preprocess | None = None,
        limit: int | None = None,
        offset: int = 0,
    ):
        inputs = tuple(inputs)
        if not inputs or not all(isinstance(spec, InputSpec) for spec in inputs):
            raise QCompilerError(f"inputs must be a non-empty list of InputSpec, got {inputs!r}")
        names = [spec.name for spec in inputs]
        if len(set(names)) != len(names):
            raise QCompilerError(f"model input names must be unique, got {names}")
        if limit is not None and not (_is_int(limit) and limit > 0):
            raise QCompilerError(f"limit must be a positive int or None, got {limit!r}")
        if not (_is_int(offset) and offset >= 0):
            raise QCompilerError(f"offset must be an int >= 0, got {offset!r}")
        self.inputs = inputs
        self.limit, self.offset = limit, offset
        self._reader = _reader(source, inputs, preprocess)
        if self._reader.count is not None and len(self) == 0:
            raise QCompilerError(self._empty_message())

    def _empty_message(self) -> str:
        return (
            f"no samples in {self._reader.name} (offset={self.offset}, limit={self.limit}, "
            f"source count={self._reader.count})"
        )

    def __len__(self) -> int:
        if self._reader.count is None:
            raise TypeError(f"the number of samples in {self._reader.name} is unknown")
        remaining = max(0, self._reader.count - self.offset)
        return remaining if self.limit is None else min(self.limit, remaining)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        stop = None if self.limit is None else self.offset + self.limit
        empty = True
        for index, sample in self._reader.read(self.offset, stop):
            empty = False
            where = f"sample {index} of {self._reader.name}"
            yield {spec.name: _conform(sample[spec.name], spec, where) for spec in self.inputs}
        if empty:
            raise QCompilerError(self._empty_message())

    def __repr__(self) -> str:
        return (
            f"CalibrationSet({self._reader.name}, inputs={[s.name for s in self.inputs]}, "
            f"offset={self.offset}, limit={self.limit})"
        )


def load_calibration(
    source,
    inputs: list[InputSpec],
    preprocess: Preprocess | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> CalibrationSet:
    """Open calibration or evaluation data.

    Parameters are those of :class:`CalibrationSet`.

    Returns
    -------
    CalibrationSet
        Checked when opened (files, folder, window) and again sample by sample as it streams.
    """
    return CalibrationSet(source, inputs, preprocess, limit=limit, offset=offset)


def save_npz_stream(path: str | os.PathLike, samples: Iterable[Mapping]) -> Path:
    """Save per-sample dicts (e.g. model outputs) as one ``.npz``, each key stacked on a new axis 0.

    The result reads back through :class:`CalibrationSet` (the ``[N, *shape]`` form). Returns the
    path, written exactly as given (no ``.npz`` appended).
    """
    path = Path(path)
    columns: dict[str, list[np.ndarray]] = {}
    for index, sample in enumerate(samples):
        if not isinstance(sample, Mapping):
            raise QCompilerError(
                f"sample {index} to save in {path} is a {type(sample).__name__}, expected a dict"
            )
        if index and set(sample) != set(columns):
            raise QCompilerError(
                f"sample {index} to save in {path} has keys {sorted(sample)}, "
                f"earlier samples {sorted(columns)}"
            )
        for key, value in sample.items():
            columns.setdefault(key, []).append(np.asarray(value))
    if not columns:
        raise QCompilerError(f"nothing to save in {path}: no samples")
    # Written next to ``path`` and renamed over it: an interrupted write leaves the old file.
    staging = path.with_name(f".{path.name}.tmp")
    try:
        # Written member by member rather than np.savez(**arrays), whose own keyword names
        # ("file", "allow_pickle") would collide with outputs so named.
        with zipfile.ZipFile(staging, "w") as archive:
            for key, arrays in columns.items():
                try:
                    stacked = np.stack(arrays)
                except ValueError as err:
                    shapes = sorted({a.shape for a in arrays})
                    raise QCompilerError(
                        f"{key!r} to save in {path} changes shape across samples: {shapes}"
                    ) from err
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, stacked, allow_pickle=False)
        staging.replace(path)
    except OSError as err:
        raise QCompilerError(f"cannot write {path}: {err}") from err
    finally:
        staging.unlink(missing_ok=True)
    return path


def labelled_images(
    folder: str | os.PathLike, labels_file: str | os.PathLike
) -> list[tuple[Path, int]]:
    """ImageNet-style labelled images: ``<synset>_<name>.jpg`` in ``folder``.

    Parameters
    ----------
    folder : str or path-like
        Images named ``<synset>_<anything>.<ext>``.
    labels_file : str or path-like
        One synset per line (e.g. ``n01440764 tench``); the label is the 0-based line index.

    Returns
    -------
    list of (Path, int)
        Sorted by file name.
    """
    folder, labels_file = Path(folder), Path(labels_file)
    try:
        lines = labels_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise QCompilerError(f"cannot read synset list {labels_file}: {err}") from err
    labels = {}
    for number, line in enumerate(lines):
        if line.strip():
            labels.setdefault(line.split()[0], number)
    if not folder.is_dir():
        raise QCompilerError(f"image folder {folder} does not exist")
    pairs = []
    for path in _image_files(folder):
        synset = path.stem.split("_", 1)[0]
        if synset not in labels:
            raise QCompilerError(f"image {path}: synset {synset!r} is not in {labels_file}")
        pairs.append((path, labels[synset]))
    return pairs
