"""Tests for qcompiler.data: streamed calibration data, its validation and image preprocessing."""

import os
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qcompiler.data import (
    CalibrationSet,
    InputSpec,
    Preprocess,
    image_sample,
    labelled_images,
    load_calibration,
    save_npz_stream,
)
from qcompiler.passes.errors import QCompilerError

SHARED = Path(os.environ.get("QC_SHARED", Path(__file__).resolve().parents[2] / "shared"))
DATA = SHARED / "data"

X = InputSpec("x", (1, 3, 4, 5), "float32")
Y = InputSpec("y", (1, 2), "int8")


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _xy(count=6):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((count, 3, 4, 5)).astype(np.float32)
    y = rng.integers(-128, 128, (count, 2)).astype(np.int8)
    return x, y


# --- .npz / .npy round trips -----------------------------------------------------------------


@pytest.mark.parametrize("batch_axis", [False, True], ids=["N+shape[1:]", "N+shape"])
@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_npz_round_trip(tmp_path, batch_axis, save):
    x, y = _xy()
    path = tmp_path / "calib.npz"
    save(path, x=x[:, None] if batch_axis else x, y=y[:, None] if batch_axis else y)
    data = load_calibration(path, [X, Y])
    assert len(data) == 6
    for _ in range(2):  # re-iterable
        samples = list(data)
        assert len(samples) == 6
        for i, sample in enumerate(samples):
            assert list(sample) == ["x", "y"]
            assert sample["x"].shape == (1, 3, 4, 5) and sample["x"].dtype == np.float32
            assert sample["y"].shape == (1, 2) and sample["y"].dtype == np.int8
            np.testing.assert_array_equal(sample["x"][0], x[i])
            np.testing.assert_array_equal(sample["y"][0], y[i])


def test_npz_streams_one_sample_at_a_time(tmp_path):
    x = np.full((64, 3, 224, 224), 7, np.float32)  # 38 MB in memory, a few kB deflated
    np.savez_compressed(tmp_path / "big.npz", x=x)
    del x
    data = load_calibration(tmp_path / "big.npz", [InputSpec("x", (1, 3, 224, 224), "float32")])
    tracemalloc.start()
    try:
        assert sum(int(s["x"][0, 0, 0, 0]) for s in data) == 7 * 64
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Read buffers and the sample in flight: a few samples' worth, far from all 64.
    assert peak < 8 * 3 * 224 * 224 * 4


def test_npy_single_input(tmp_path):
    x, _ = _xy()
    np.save(tmp_path / "x.npy", x)
    samples = list(CalibrationSet(str(tmp_path / "x.npy"), [X], offset=4))
    assert len(samples) == 2
    np.testing.assert_array_equal(samples[1]["x"], x[5:6])
    with pytest.raises(QCompilerError, match=r"\.npy.*\['x', 'y'\].*\.npz"):
        CalibrationSet(tmp_path / "x.npy", [X, Y])


@pytest.mark.parametrize(
    ("offset", "limit", "expected"),
    [(0, None, range(6)), (0, 2, range(2)), (2, None, range(2, 6)), (4, 10, range(4, 6))],
)
def test_limit_offset_window(tmp_path, offset, limit, expected):
    x, y = _xy()
    path = _npz(tmp_path / "c.npz", x=x, y=y)
    for source in (path, [{"x": x[i : i + 1], "y": y[i : i + 1]} for i in range(6)]):
        data = load_calibration(source, [X, Y], limit=limit, offset=offset)
        assert len(data) == len(expected)
        got = [s["y"][0] for s in data]
        np.testing.assert_array_equal(np.array(got), y[list(expected)])


def test_calibrate_and_evaluate_are_disjoint(tmp_path):
    x, y = _xy()
    path = _npz(tmp_path / "c.npz", x=x, y=y)
    calib = [s["y"].tobytes() for s in load_calibration(path, [X, Y], limit=2)]
    evaluate = [s["y"].tobytes() for s in load_calibration(path, [X, Y], offset=2)]
    assert len(calib) + len(evaluate) == 6 and not set(calib) & set(evaluate)


def test_uint8_for_float_input_is_cast(tmp_path):
    images = np.arange(2 * 60, dtype=np.uint8).reshape(2, 3, 4, 5)
    (sample, _) = load_calibration(_npz(tmp_path / "u8.npz", x=images), [X])
    assert sample["x"].dtype == np.float32
    np.testing.assert_array_equal(sample["x"][0], images[0].astype(np.float32))


def test_save_npz_stream_round_trip(tmp_path):
    x, y = _xy(3)
    samples = [{"x": x[i : i + 1], "y": y[i : i + 1]} for i in range(3)]
    path = save_npz_stream(tmp_path / "out.npz", samples)
    assert path == tmp_path / "out.npz" and path.exists()
    with np.load(path) as stored:
        np.testing.assert_array_equal(stored["x"], x[:, None])
    back = list(load_calibration(path, [X, Y]))
    np.testing.assert_array_equal(back[2]["y"], y[2:3])


def test_save_npz_stream_errors(tmp_path):
    with pytest.raises(QCompilerError, match="no samples"):
        save_npz_stream(tmp_path / "o.npz", [])
    with pytest.raises(QCompilerError, match=r"sample 1 .*\['b'\].*\['a'\]"):
        save_npz_stream(tmp_path / "o.npz", [{"a": 1}, {"b": 2}])
    with pytest.raises(QCompilerError, match=r"'a' .*changes shape.*\(2,\), \(3,\)"):
        save_npz_stream(tmp_path / "o.npz", [{"a": np.zeros(2)}, {"a": np.zeros(3)}])


# --- iterables -------------------------------------------------------------------------------


def test_iterable_samples_validated_as_they_stream():
    good = {"x": np.zeros((1, 3, 4, 5), np.float32)}
    bad = {"x": np.full((1, 3, 4, 5), np.nan, np.float32)}
    stream = iter(CalibrationSet([good, good, bad], [X]))
    next(stream), next(stream)
    with pytest.raises(QCompilerError, match=r"'x' \(sample 2 of the calibration iterable\).*NaN"):
        next(stream)


def test_iterable_sample_without_batch_axis_gets_one():
    (sample,) = CalibrationSet([{"x": np.ones((3, 4, 5), np.uint8)}], [X])
    assert sample["x"].shape == (1, 3, 4, 5) and sample["x"].dtype == np.float32


def test_generator_is_one_shot_and_unsized():
    data = CalibrationSet(({"x": np.zeros((1, 3, 4, 5))} for _ in range(3)), [X])
    with pytest.raises(TypeError):
        len(data)
    assert len(list(data)) == 3
    with pytest.raises(QCompilerError, match="one-shot iterator"):
        list(data)


@pytest.mark.parametrize(
    ("samples", "match"),
    [
        ([], "no samples in the calibration iterable"),
        ([np.zeros((1, 3, 4, 5))], "sample 0 .* is a ndarray, expected a dict"),
        ([{"z": np.zeros((1, 3, 4, 5))}], r"missing model input\(s\) \['x'\], extra keys \['z'\]"),
        ([{"x": np.zeros((1, 5, 4, 3))}], r"'x' .*shape \(1, 3, 4, 5\), got \(1, 5, 4, 3\)"),
        ([{"x": np.zeros((1, 3, 4, 5), np.complex64)}], "'x' .*complex64 cannot feed a float32"),
        ([{"x": np.full((1, 3, 4, 5), "a")}], "'x' .*<U1 cannot feed"),
        ([{"x": np.full((1, 3, 4, 5), np.inf)}], r"'x' \(sample 0 .*NaN or Inf"),
    ],
    ids=["empty", "not-dict", "keys", "shape", "complex", "str", "inf"],
)
def test_iterable_errors(samples, match):
    with pytest.raises(QCompilerError, match=match):
        list(CalibrationSet(samples, [X]))


def test_one_dict_source_is_refused():
    with pytest.raises(QCompilerError, match=r"one dict.*\[sample\]"):
        CalibrationSet({"x": np.zeros((1, 3, 4, 5))}, [X])


# --- file validation -------------------------------------------------------------------------


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(QCompilerError, match=re.escape(str(tmp_path / "nope.npz"))):
        load_calibration(tmp_path / "nope.npz", [X])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(QCompilerError, match=r"cannot read calibration file .*garbage\.npz"):
        load_calibration(garbage, [X])
    other = tmp_path / "data.csv"
    other.write_text("1,2")
    with pytest.raises(QCompilerError, match=r"data\.csv is not an \.npz"):
        load_calibration(other, [X])


def test_npz_input_errors(tmp_path):
    x, y = _xy()
    only_x = _npz(tmp_path / "x.npz", x=x)
    with pytest.raises(QCompilerError, match=r"no array for model input\(s\) \['y'\]; it holds"):
        load_calibration(only_x, [X, Y])
    with pytest.raises(QCompilerError, match=r"arrays \['labels'\] that are not model inputs"):
        load_calibration(_npz(tmp_path / "xl.npz", x=x, labels=y), [X])
    with pytest.raises(
        QCompilerError,
        match=re.escape("'x' (in ")
        + r".*expected shape \[N, 1, 3, 4, 5\] or \[N, 3, 4, 5\].*"
        + re.escape("got [6, 3, 5, 4]"),
    ):
        load_calibration(_npz(tmp_path / "t.npz", x=x.transpose(0, 1, 3, 2)), [X])
    with pytest.raises(QCompilerError, match=r"different sample counts \{'x': 6, 'y': 5\}"):
        load_calibration(_npz(tmp_path / "n.npz", x=x, y=y[:5]), [X, Y])
    with pytest.raises(QCompilerError, match=r"no samples in .*empty\.npz"):
        load_calibration(_npz(tmp_path / "empty.npz", x=x[:0]), [X])
    with pytest.raises(QCompilerError, match="offset=6.*source count=6"):
        load_calibration(only_x, [X], offset=6)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((2, 3, 4, 5), np.complex64), "dtype complex64 cannot feed a float32"),
        (np.full((2, 3, 4, 5), "a"), "dtype <U1 cannot feed a float32"),
        (np.empty((2, 3, 4, 5), object), "dtype object cannot feed a float32"),
    ],
    ids=["complex", "str", "object"],
)
def test_npz_dtype_kind_errors(tmp_path, array, match):
    np.savez(tmp_path / "k.npz", x=array)
    with pytest.raises(QCompilerError, match=r"input 'x' \(in .*k\.npz\): " + match):
        load_calibration(tmp_path / "k.npz", [X])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npz_non_finite_names_input_and_sample(tmp_path, bad):
    x, y = _xy()
    x[4, 1, 2, 3] = bad
    data = load_calibration(_npz(tmp_path / "c.npz", x=x, y=y), [X, Y], offset=3)
    with pytest.raises(QCompilerError, match=r"input 'x' \(sample 4 of .*c\.npz\): contains NaN"):
        list(data)


def test_integer_input_from_floats(tmp_path):
    whole = np.array([[3.0, -4.0]], np.float32)
    (sample,) = load_calibration([{"y": whole}], [Y])
    np.testing.assert_array_equal(sample["y"], [[3, -4]])
    assert sample["y"].dtype == np.int8
    with pytest.raises(QCompilerError, match="'y' .*int8 input given non-integer values"):
        list(load_calibration([{"y": whole + 0.5}], [Y]))
    with pytest.raises(QCompilerError, match=r"'y' .*values span \[-4, 300\], outside int8"):
        list(load_calibration([{"y": np.array([[300, -4]])}], [Y]))


def test_preprocess_refused_for_arrays(tmp_path):
    x, _ = _xy()
    with pytest.raises(QCompilerError, match="preprocessing applies to images only"):
        load_calibration(_npz(tmp_path / "x.npz", x=x), [X], Preprocess())


def test_bad_window_and_specs():
    with pytest.raises(QCompilerError, match="limit must be a positive int or None, got 0"):
        CalibrationSet([], [X], limit=0)
    with pytest.raises(QCompilerError, match="offset must be an int >= 0, got -1"):
        CalibrationSet([], [X], offset=-1)
    with pytest.raises(QCompilerError, match=r"unique, got \['x', 'x'\]"):
        CalibrationSet([], [X, X])
    with pytest.raises(QCompilerError, match=r"input 'a': shape \(1, -1\) must have positive"):
        InputSpec("a", (1, -1), "float32")
    with pytest.raises(QCompilerError, match="input 'a': dtype 'str' is not numeric"):
        InputSpec("a", (1,), "str")
    assert InputSpec("a", [1, np.int64(3)], np.float32) == InputSpec("a", (1, 3), "float32")


# --- image preprocessing ---------------------------------------------------------------------

# 40 wide x 30 high, every channel a different ramp so crops, flips and channel swaps all show.
_YY, _XX = np.mgrid[0:30, 0:40]
_GRADIENT = np.stack([_XX * 6, _YY * 8, 255 - _XX * 3 - _YY * 2], axis=-1).astype(np.uint8)


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "gradient.png"
    Image.fromarray(_GRADIENT).save(path)
    return path


def _resized(width, height, mode="RGB"):
    image = Image.fromarray(_GRADIENT).convert(mode)
    pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), np.float64)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def test_image_straight_resize(picture):
    out = image_sample(picture, InputSpec("in", (1, 3, 16, 20), "float32"), Preprocess())
    assert out.shape == (1, 3, 16, 20) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], _resized(20, 16).transpose(2, 0, 1))


def test_image_resize_centre_crop_mean_std(picture):
    pre = Preprocess(resize=20, size=(16, 16), mean=(10, 20, 30), std=(2, 4, 8))
    out = image_sample(picture, InputSpec("in", (1, 3, 16, 16), "float32"), pre)
    # Shorter side 30 -> 20, longer 40 -> floor(20 * 40 / 30) = 26; crop offsets (20-16)/2 = 2
    # rows and (26-16)/2 = 5 columns.
    crop = _resized(26, 20)[2:18, 5:21]
    expected = (crop - [10, 20, 30]) / [2, 4, 8]
    np.testing.assert_allclose(out[0], expected.transpose(2, 0, 1), rtol=1e-6)


def test_image_bgr_nhwc(picture):
    pre = Preprocess(channels="BGR", layout="NHWC", mean=(1, 2, 3))
    out = image_sample(picture, InputSpec("in", (1, 16, 20, 3), "float32"), pre)
    expected = _resized(20, 16)[:, :, ::-1] - [1, 2, 3]
    np.testing.assert_allclose(out[0], expected)


def test_image_gray(picture):
    pre = Preprocess(channels="GRAY", mean=(100,), std=(50,))
    out = image_sample(picture, InputSpec("in", (1, 1, 15, 20), "float32"), pre)
    np.testing.assert_allclose(out[0], ((_resized(20, 15, "L") - 100) / 50).transpose(2, 0, 1))


def test_image_letterbox_pads_bottom(picture):
    spec = InputSpec("in", (1, 3, 32, 32), "float32")
    out = image_sample(picture, spec, Preprocess(letterbox=True))
    # scale = min(32/30, 32/40) = 0.8: content 32 wide x 24 high, rows 24.. are padding.
    np.testing.assert_allclose(out[0, :, :24, :], _resized(32, 24).transpose(2, 0, 1))
    assert (out[0, :, 24:, :] == 114.0).all()


def test_image_letterbox_pads_right(picture):
    pre = Preprocess(letterbox=True, layout="NHWC", pad_value=0.0)
    out = image_sample(picture, InputSpec("in", (1, 16, 32, 3), "float32"), pre)
    # scale = min(16/30, 32/40) = 8/15: content floor(40 * 8/15) = 21 wide x 16 high.
    np.testing.assert_allclose(out[0, :, :21], _resized(21, 16))
    assert (out[0, :, 21:] == 0.0).all()


def test_image_integer_inputs(picture):
    out = image_sample(picture, InputSpec("in", (1, 16, 20, 3), "uint8"), Preprocess(layout="NHWC"))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0], np.rint(_resized(20, 16)))
    with pytest.raises(QCompilerError, match=r"'in' .*outside int8 \[-128, 127\]"):
        image_sample(picture, InputSpec("in", (1, 16, 20, 3), "int8"), Preprocess(layout="NHWC"))


def test_image_geometry_errors(picture):
    nchw = InputSpec("in", (1, 3, 16, 20), "float32")
    with pytest.raises(QCompilerError, match=r"has 20 channels in NHWC layout.*check layout"):
        image_sample(picture, nchw, Preprocess(layout="NHWC"))
    with pytest.raises(QCompilerError, match="preprocessing size 8x8 differs from input 'in'"):
        image_sample(picture, nchw, Preprocess(size=(8, 8)))
    with pytest.raises(QCompilerError, match=r"is 20x26 after resize=20, too small to crop 24x24"):
        image_sample(picture, InputSpec("in", (1, 3, 24, 24), "float32"), Preprocess(resize=20))


def test_image_folder(tmp_path, picture):
    Image.fromarray(_GRADIENT[::-1]).save(tmp_path / "b.png")
    (tmp_path / "notes.txt").write_text("not an image")
    spec = InputSpec("in", (1, 3, 15, 20), "float32")
    data = load_calibration(tmp_path, [spec], Preprocess())
    assert len(data) == 2
    first, second = data
    np.testing.assert_array_equal(second["in"], image_sample(picture, spec, Preprocess()))
    assert not np.array_equal(first["in"], second["in"])
    (only,) = load_calibration(picture, [spec], Preprocess())
    np.testing.assert_array_equal(only["in"], second["in"])


def test_image_folder_errors(tmp_path):
    spec = InputSpec("in", (1, 3, 8, 8), "float32")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(QCompilerError, match=f"folder {re.escape(str(tmp_path))} holds no images"):
        load_calibration(tmp_path, [spec], Preprocess())
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    data = load_calibration(tmp_path, [spec], Preprocess())
    with pytest.raises(QCompilerError, match=f"cannot decode image {re.escape(str(broken))}"):
        list(data)
    with pytest.raises(QCompilerError, match="needs a preprocessing"):
        load_calibration(tmp_path, [spec])
    with pytest.raises(QCompilerError, match=r"feeds one input, the model has \['in', 'x'\]"):
        load_calibration(tmp_path, [spec, X], Preprocess())


# --- Preprocess ------------------------------------------------------------------------------


def test_parse_cli_string():
    pre = Preprocess.parse("resize=256,size=224x224,mean=127,std=128,layout=NCHW,channels=RGB")
    assert pre == Preprocess(size=(224, 224), resize=256, mean=(127.0,), std=(128.0,))
    assert pre.mean == (127.0, 127.0, 127.0) and pre.std == (128.0, 128.0, 128.0)


def test_parse_per_channel_flags_and_case():
    pre = Preprocess.parse("size=224,mean=123.675,116.28,103.53,std=58.395,57.12,57.375")
    assert pre.size == (224, 224) and pre.mean == (123.675, 116.28, 103.53)
    assert pre.std == (58.395, 57.12, 57.375)
    pre = Preprocess.parse("letterbox, channels=bgr, layout=nhwc, pad_value=0")
    assert (pre.letterbox, pre.channels, pre.layout, pre.pad_value) == (True, "BGR", "NHWC", 0.0)
    assert Preprocess.parse("channels=GRAY").mean == (0.0,)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("size=224,crop=200", r"unknown preprocessing key 'crop'.*valid keys: size, resize, mean"),
        ("resize=big", r"resize='big'"),
        ("size=1x2x3", r"size='1x2x3'.*HxW"),
        ("size=224,size=256", "'size' given twice"),
        ("224", "'224' .* is not key=value"),
        ("letterbox=maybe", "letterbox='maybe'"),
        ("mean=1,2", r"mean \(1.0, 2.0\) has 2 values but channels=RGB has 3"),
        ("layout=CHW", r"layout 'CHW' is not one of \('NCHW', 'NHWC'\)"),
        ("std=0", "std .* has a zero"),
        ("letterbox,resize=256", "choose one"),
    ],
)
def test_parse_errors(text, match):
    with pytest.raises(QCompilerError, match=match):
        Preprocess.parse(text)


# --- the shared data set -------------------------------------------------------------------


@pytest.mark.skipif(not (DATA / "imagenet_samples").is_dir(), reason="shared data missing")
def test_imagenet_samples():
    pre = Preprocess.parse("resize=256,size=224x224,mean=127,std=128")
    spec = InputSpec("input", (1, 3, 224, 224), "float32")
    data = load_calibration(DATA / "imagenet_samples", [spec], pre, limit=3)
    samples = list(data)
    assert len(data) == len(samples) == 3
    for sample in samples:
        assert sample["input"].shape == (1, 3, 224, 224) and sample["input"].dtype == np.float32
        assert -1.0 <= sample["input"].min() < sample["input"].max() <= 1.0

    pairs = labelled_images(DATA / "imagenet_samples", DATA / "imagenet_synsets.txt")
    assert len(pairs) == 500 and pairs == sorted(pairs)
    lines = (DATA / "imagenet_synsets.txt").read_text().split("\n")
    synsets = [line.split(" ")[0] for line in lines]
    assert pairs[0] == (DATA / "imagenet_samples" / "n01440764_tench.jpg", 0)
    path, label = pairs[-1]
    assert label == synsets.index(path.name.split("_")[0]) > 900


@pytest.mark.skipif(not (DATA / "mnist_test.npz").is_file(), reason="shared data missing")
def test_mnist_streamed_from_compressed_npz():
    specs = [InputSpec("images", (1, 28, 28), "float32"), InputSpec("labels", (1,), "int64")]
    data = load_calibration(DATA / "mnist_test.npz", specs, offset=9998)
    assert len(data) == 2
    with np.load(DATA / "mnist_test.npz") as mnist:
        expected_images, expected_labels = mnist["images"][9998:], mnist["labels"][9998:]
    for sample, image, label in zip(data, expected_images, expected_labels, strict=True):
        np.testing.assert_array_equal(sample["images"][0], image)
        assert sample["labels"][0] == label


def test_labelled_images_errors(tmp_path):
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n001 tench\nn002 goldfish\n")
    Image.fromarray(_GRADIENT).save(tmp_path / "n002_goldfish.png")
    assert labelled_images(tmp_path, synsets) == [(tmp_path / "n002_goldfish.png", 1)]
    Image.fromarray(_GRADIENT).save(tmp_path / "n999_unknown.png")
    with pytest.raises(QCompilerError, match=r"n999_unknown\.png: synset 'n999' is not in"):
        labelled_images(tmp_path, synsets)
    with pytest.raises(QCompilerError, match="cannot read synset list .*missing.txt"):
        labelled_images(tmp_path, tmp_path / "missing.txt")
