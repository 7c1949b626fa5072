"""Measured activation sensitivity: the fake-quantized probe against onnxruntime and against
the compiled integer model."""

import numpy as np
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from test_detector_exits import head_model, samples

import qcompiler
from qcompiler.passes import rounding
from qcompiler.passes.graph import bindings, const_value, op_name
from qcompiler.passes.pipeline import PROBE_HOLDOUT
from qcompiler.targets.sensitivity import SensitivityProbe, output_psnr, output_sqnr

ort = pytest.importorskip("onnxruntime")


def test_output_sqnr_holds_each_column_to_its_own_peak():
    rng = np.random.default_rng(0)
    ref = [[rng.normal(size=(1, 100, 3)) * np.array([100.0, 1.0, 0.01])] for _ in range(2)]
    noise = [[r[0] + 0.001 * rng.normal(size=r[0].shape)] for r in ref]
    stacked = np.concatenate([r[0] for r in ref]).reshape(-1, 3)
    got = np.concatenate([n[0] for n in noise]).reshape(-1, 3)
    peak = np.abs(stacked).max(axis=0) ** 2
    expected = 10 * np.log10(((stacked**2).mean(0) / peak).sum()
                             / (((stacked - got) ** 2).mean(0) / peak).sum())  # fmt: skip
    assert output_sqnr(ref, noise) == pytest.approx(expected, rel=1e-9)
    # the 0.01-scale column drowns in noise of 0.001: its share dominates the ratio
    assert output_sqnr(ref, noise) < 25
    flat = [[np.ones((1, 10))]]
    assert output_sqnr(flat, [[np.ones((1, 10)) * 1.01]]) == pytest.approx(40.0)
    assert output_sqnr(flat, flat) == float("inf")


def _fake_quantized_weights(model):
    """The model with every conv weight rounded as qcompiler's default scheme does (symmetric,
    per output channel, codes in [-127, 127]), in numpy."""
    out = type(model)()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        w = numpy_helper.to_array(init).astype(np.float64)
        scale = np.abs(w).reshape(len(w), -1).max(axis=1) / 127
        shape = (-1,) + (1,) * (w.ndim - 1)
        q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127) * scale.reshape(shape)
        init.CopyFrom(numpy_helper.from_array(q.astype(np.float32), init.name))
    return out


def test_probe_matches_onnxruntime_and_the_integer_build():
    model = head_model()
    calib = samples(16)
    imported, calibration = qcompiler.calibrate(qcompiler.api.load_model(model), calib)
    probe_samples = samples(3, seed=11)
    result = qcompiler.api.activation_sensitivity(calibration, probe_samples)
    assert sorted(result.alone_db) == sorted(p.name for p in calibration.plan.points)

    def sqnr_against_float(session):
        float_session = ort.InferenceSession(model.SerializeToString(),
                                             providers=["CPUExecutionProvider"])  # fmt: skip
        ref = [float_session.run(None, s) for s in probe_samples]
        return output_sqnr(ref, [session(s) for s in probe_samples])

    # activations exact, weights rounded: what onnxruntime computes with numpy-rounded weights
    fq = ort.InferenceSession(_fake_quantized_weights(model).SerializeToString(),
                              providers=["CPUExecutionProvider"])  # fmt: skip
    assert result.weights_db == pytest.approx(sqnr_against_float(lambda s: fq.run(None, s)),
                                              abs=0.1)  # fmt: skip
    # every activation at 8 bits: what the compiled integer model computes, to rounding order
    artifact = qcompiler.quantize(imported, None, calibration=calibration).build()
    integer_db = sqnr_against_float(lambda s: [artifact.run(s)["output"]])
    assert result.all_db == pytest.approx(integer_db, abs=2.0)
    assert result.all_db < result.weights_db
    assert all(result.all_db - 0.5 <= db for db in result.alone_db.values())
    assert result.ranked()[0] == min(result.alone_db, key=result.alone_db.get)


def _rounded(model, bits_of, hessians=None, optimized=(4, 8)):
    """The model with each conv weight ``init`` rounded to ``bits_of(init.name)`` bits,
    symmetric per output channel (codes in [-(2**(b-1)-1), 2**(b-1)-1]), in numpy: max-abs
    scales at 8 bits; at 4, per channel the scale of least squared error among max-abs times
    0.5, 0.52, ..., 1 (qcompiler's rule for 4-bit weights). With ``hessians[init.name]`` (the
    second moment of the layer's input patches), the codes of the bit-widths in ``optimized``
    are then chosen against it by ``rounding.round_weights`` instead of to nearest."""
    out = type(model)()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        w = numpy_helper.to_array(init).astype(np.float64)
        bits = bits_of(init.name)
        top = 2 ** (bits - 1) - 1
        rows = w.reshape(len(w), -1)
        q = np.empty_like(rows)
        scales = np.empty(len(rows))
        for c, row in enumerate(rows):
            peak = np.abs(row).max() / np.float32(top)
            factors = np.linspace(0.5, 1.0, 26) if bits == 4 else [1.0]
            best = None
            for f in factors:
                s = np.float64(np.float32(peak * f))
                candidate = np.clip(np.rint(row / s), -top, top) * s
                error = ((candidate - row) ** 2).sum()
                if best is None or error < best[0]:
                    best = (error, candidate, s)
            q[c], scales[c] = best[1], best[2]
        if hessians is not None and init.name in hessians and bits in optimized:
            h = hessians[init.name][None]
            codes = rounding.round_weights(rows[None], scales[None], -top, top, h)[0]
            q = codes * scales[:, None]
        init.CopyFrom(numpy_helper.from_array(q.reshape(w.shape).astype(np.float32), init.name))
    return out


def _initializer_names(model, calibration) -> dict[str, str]:
    """Each conv layer of the calibrated module (as the probe names them, by their tensors)
    -> its weight initializer in the ONNX file, found by value (OHWI in the compiled float
    model, OIHW in the file)."""
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    names = {}
    for b in bindings(calibration.mod["main"]):
        if op_name(b.value) == "relax.nn.conv2d":
            weight = const_value(b.value.args[1]).transpose(0, 3, 1, 2)
            (names[b.var.name],) = [n for n, w in initializers.items() if np.array_equal(w, weight)]
    return names


def test_weight_probe_matches_onnxruntime_with_4_bit_weights():
    """Each layer alone at 4 bits (the others at 8, activations exact): the probe's output
    SQNR against onnxruntime running numpy-rounded weights."""
    from qcompiler.targets.boards import resolve_target
    from qcompiler.targets.sensitivity import WeightProbe

    model = head_model()
    imported, calibration = qcompiler.calibrate(qcompiler.api.load_model(model), samples(16))
    probe_samples = samples(3, seed=12)
    target = resolve_target("x86")
    probe = WeightProbe(calibration, qcompiler.QuantConfig(), probe_samples, target)
    alone, base = probe.measure()
    float_session = ort.InferenceSession(model.SerializeToString(),
                                         providers=["CPUExecutionProvider"])  # fmt: skip
    ref = [float_session.run(None, s) for s in probe_samples]
    names = _initializer_names(model, calibration)
    assert sorted(probe.names) == sorted(names) and len(names) == 3
    for name, weight in names.items():
        rounded = _rounded(model, lambda n, w=weight: 4 if n == w else 8)
        session = ort.InferenceSession(rounded.SerializeToString(),
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        expected = output_sqnr(ref, [session.run(None, s) for s in probe_samples])
        assert alone[name] == pytest.approx(expected, abs=0.1)
        assert alone[name] < base


def _patch_moments(model, calib):
    """``E[p pᵀ]`` of each conv's input patches ``p`` over every position of ``calib``, in
    numpy from onnxruntime's tensors; a 3x3 patch in (c, kh, kw) order, as OIHW weights
    flatten (sequential rounding depends on the order)."""
    tapped = type(model)()
    tapped.CopyFrom(model)
    tapped.graph.output.append(helper.make_tensor_value_info("a", TensorProto.FLOAT, None))
    session = ort.InferenceSession(tapped.SerializeToString(), providers=["CPUExecutionProvider"])
    first, hidden = [], []
    for sample in calib:
        x = np.pad(sample["x"][0], ((0, 0), (1, 1), (1, 1)))
        first += [x[:, i : i + 3, j : j + 3].reshape(-1) for i in range(6) for j in range(6)]
        hidden.append(session.run(["a"], sample)[0][0].reshape(8, -1).T)
    first, hidden = np.asarray(first, np.float64), np.concatenate(hidden).astype(np.float64)
    moment = {"w": first.T @ first / len(first), "box": hidden.T @ hidden / len(hidden)}
    return {**moment, "cls": moment["box"]}


@pytest.mark.parametrize("rounding, optimized", [("optimized", (4, 8)), ("auto", (4,))])
def test_weight_probe_rounds_as_the_build(rounding, optimized):
    """The probe measures the weights rounded as the build rounds them: against each layer's
    input statistics at the bit-widths the rounding optimizes (``auto``: 4-bit layers only),
    to nearest at the others. Each layer alone at 4 bits against onnxruntime running weights
    rounded in numpy, by GPTQ + descent on numpy's moments where optimized: those of the
    calibration samples after the first PROBE_HOLDOUT, which the probe scores on."""
    model = head_model()
    calib = samples(PROBE_HOLDOUT + 16)  # 16 after the held-out ones: 8 patches per value
    imported, calibration = qcompiler.calibrate(
        qcompiler.api.load_model(model), calib, layer_inputs=True
    )
    config = qcompiler.QuantConfig(weight_rounding=rounding)
    probe = qcompiler.api.weight_probe(calibration, config, calib[:3])
    alone, base = probe.measure()
    nearest_config = qcompiler.QuantConfig(weight_rounding="nearest")
    nearest, _ = qcompiler.api.weight_probe(calibration, nearest_config, calib[:3]).measure()
    moments = _patch_moments(model, calib[PROBE_HOLDOUT:])  # the probe's samples left out
    float_session = ort.InferenceSession(model.SerializeToString(),
                                         providers=["CPUExecutionProvider"])  # fmt: skip
    ref = [float_session.run(None, s) for s in calib[:3]]
    names = _initializer_names(model, calibration)
    for name, weight in names.items():
        rounded = _rounded(model, lambda n, w=weight: 4 if n == w else 8, moments, optimized)
        session = ort.InferenceSession(rounded.SerializeToString(),
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        expected = output_sqnr(ref, [session.run(None, s) for s in calib[:3]])
        assert alone[name] == pytest.approx(expected, abs=0.1)
    # not what nearest rounding gives (which the comparison above would then have missed)
    assert max(abs(alone[n] - nearest[n]) for n in names) > 1.0


def _biased_model():
    """x[1,6,6,6] -> Conv (3x3, bias) -> Relu -> Conv (1x1, bias) -> y[1,4,6,6]."""
    rng = np.random.default_rng(5)
    arrays = {
        "w1": rng.normal(scale=0.3, size=(8, 6, 3, 3)),
        "b1": rng.normal(scale=0.5, size=8),
        "w2": rng.normal(scale=0.5, size=(4, 8, 1, 1)),
        "b2": rng.normal(size=4),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "biased",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_weight_probe_removes_the_mean_shift_of_4_bit_layers():
    """Where a bias can take it, a 4-bit layer's mean output error ``r·μ`` is removed and its
    codes are rounded against the covariance of its inputs (``Σ = H - μμᵀ``), as the build
    does. Each layer alone at 4 bits against onnxruntime running weights rounded in numpy
    against numpy's covariance of the patches (the samples after PROBE_HOLDOUT) and biases
    less numpy's shift."""
    model = _biased_model()
    rng = np.random.default_rng(2)
    calib = [
        {"x": (rng.normal(size=(1, 6, 6, 6)) + 1.0).astype(np.float32)}  # inputs of mean 1
        for _ in range(PROBE_HOLDOUT + 24)
    ]
    imported, calibration = qcompiler.calibrate(
        qcompiler.api.load_model(model), calib, layer_inputs=True
    )
    alone, _ = qcompiler.api.weight_probe(calibration, qcompiler.QuantConfig(), calib[:3]).measure()

    tapped = type(model)()
    tapped.CopyFrom(model)
    tapped.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, None))
    session = ort.InferenceSession(tapped.SerializeToString(), providers=["CPUExecutionProvider"])
    patches = {"w1": [], "w2": []}
    for sample in calib[PROBE_HOLDOUT:]:
        x = np.pad(sample["x"][0], ((0, 0), (1, 1), (1, 1)))
        patches["w1"] += [
            x[:, i : i + 3, j : j + 3].reshape(-1) for i in range(6) for j in range(6)
        ]
        patches["w2"] += list(session.run(["r"], sample)[0][0].reshape(8, -1).T)
    float_session = ort.InferenceSession(model.SerializeToString(),
                                         providers=["CPUExecutionProvider"])  # fmt: skip
    ref = [float_session.run(None, s) for s in calib[:3]]

    def sqnr(rounded_model):
        session = ort.InferenceSession(rounded_model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])  # fmt: skip
        return output_sqnr(ref, [session.run(None, s) for s in calib[:3]])

    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    names = _initializer_names(model, calibration)
    assert sorted(names.values()) == ["w1", "w2"]
    unshifted, uncentred = {}, {}
    for name, weight in names.items():
        p = np.asarray(patches[weight], dtype=np.float64)
        mean, moment = p.mean(axis=0), p.T @ p / len(p)
        covariance = moment - np.outer(mean, mean)
        four = lambda n, w=weight: 4 if n == w else 8  # noqa: E731
        # the bias initializers are rounded too, each value its own 8-bit scale: exactly
        centred = _rounded(model, four, {weight: covariance}, (4,))
        rounded = {i.name: numpy_helper.to_array(i) for i in centred.graph.initializer}
        error = (rounded[weight] - initializers[weight]).reshape(-1, p.shape[1])
        bias = "b" + weight[1:]
        shifted = (initializers[bias] - error @ mean).astype(np.float32)
        for init in centred.graph.initializer:
            if init.name == bias:
                init.CopyFrom(numpy_helper.from_array(shifted, bias))
        assert alone[name] == pytest.approx(sqnr(centred), abs=0.1)
        # the comparison can tell: the same codes with the bias left alone, and codes
        # rounded against the second moment with the bias left alone
        unshifted[name] = sqnr(_rounded(model, four, {weight: covariance}, (4,)))
        uncentred[name] = sqnr(_rounded(model, four, {weight: moment}, (4,)))
    assert max(alone[n] - unshifted[n] for n in names) > 1.0
    assert max(abs(alone[n] - uncentred[n]) for n in names) > 0.5
    # the build rounds and shifts the same (activations at 16 bits add little noise)
    layer = max(names, key=lambda n: alone[n] - unshifted[n])
    config = qcompiler.QuantConfig(
        int4_weights=(layer,), int16_activations=1.0, weight_rounding="optimized-4bit"
    )
    artifact = qcompiler.quantize(imported, None, config, calibration=calibration).build()
    built = output_sqnr(ref, [list(artifact.run(s).values()) for s in calib[:3]])
    assert built == pytest.approx(alone[layer], abs=0.3)


def _outlier_model(outlier: float):
    """x[1,4,8,8] -> Conv (1x1) -> Relu -> Conv (1x1) -> y[1,2,8,8]. With ``outlier`` > 1 the
    first conv's channel 0 spans ``outlier`` times the others while the second conv all but
    ignores it: one shared 8-bit step for the hidden tensor, set by a channel that does not
    matter, leaves the channels that do only a few codes."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(scale=0.5, size=(4, 4, 1, 1)).astype(np.float32)
    w1[0] *= outlier
    w2 = rng.normal(scale=0.5, size=(2, 4, 1, 1)).astype(np.float32)
    w2[:, 0] /= outlier
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _calib(n, seed):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, 4, 8, 8)).astype(np.float32)} for _ in range(n)]


def _error(model, artifact, tests):
    """Mean squared error of ``artifact`` against onnxruntime's float ``model``."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.mean([(artifact.run(s)["output"] - session.run(None, s)[0]) ** 2 for s in tests])


def test_default_int16_goes_where_8_bits_cost_the_outputs():
    model = _outlier_model(outlier=300.0)
    imported, calibration = qcompiler.calibrate(qcompiler.api.load_model(model), _calib(16, 4))
    default = qcompiler.quantize(imported, None, calibration=calibration)
    choice = default.activation_choice
    assert choice is not None and choice.all_db < choice.weights_db - 1
    # the hidden tensor (the relu's output, the widest calibration range) and nothing else
    widest = max(calibration.observers, key=lambda p: np.ptp(calibration.observers[p].range(
        "minmax", default.config.scheme.activation)))  # fmt: skip
    assert default.config.int16_activations == (widest.name,)
    assert choice.chosen_db > choice.all_db + 10
    tests = _calib(4, 5)
    eight = qcompiler.quantize(
        imported, None, qcompiler.QuantConfig(int16_activations=()), calibration=calibration
    )
    # what is left is mostly the input's own 8-bit rounding (one tensor of two may go to 16)
    assert _error(model, default.build(), tests) < _error(model, eight.build(), tests) / 5
    manifest = default.build().manifest["quantization"]
    assert manifest["int16_activations"] == [widest.name]
    assert manifest["activations_measured"]["chosen_db"] == pytest.approx(choice.chosen_db)


def test_default_int16_leaves_a_model_that_8_bits_serve():
    model = _outlier_model(outlier=1.0)
    quantized = qcompiler.quantize(model, _calib(16, 4))
    assert quantized.config.int16_activations == ()
    assert quantized.activation_choice.alone_db == {}  # two runs of the probe decided it
    assert quantized.activation_choice.all_db >= 30


def test_auto_int16_needs_the_measurement():
    _, calibration = qcompiler.calibrate(
        qcompiler.api.load_model(_outlier_model(1.0)), _calib(4, 4)
    )
    with pytest.raises(qcompiler.api.QCompilerError, match="measured on the model's outputs"):
        calibration.quantize(qcompiler.QuantConfig())
    assert len(calibration.samples) == 2  # kept for the probe, no more


def test_output_psnr_is_each_columns_error_against_its_peak_averaged():
    ref = [[np.array([[[1.0, 0.01], [-2.0, 0.0], [0.5, 0.02]] * 22])]]  # 66 rows, 2 columns
    got = [[ref[0][0] + np.array([0.1, 0.001])]]
    # column 0: error 0.1 against peak 2; column 1: 0.001 against 0.02 (both -26.02 dB)
    expected = -10 * np.log10(np.mean([(0.1 / 2) ** 2, (0.001 / 0.02) ** 2]))
    assert output_psnr(ref, got) == pytest.approx(expected)
    assert output_psnr(ref, ref) == float("inf")


def _conv1x1(x, w):
    return np.einsum("nchw,oc->nohw", x, w[:, :, 0, 0].astype(np.float64))


def test_probe_rounds_with_any_scale_and_zero_point_it_is_given():
    """The probe's rounding of one tensor with a scale and zero point passed at run time,
    against the same model in numpy: weights rounded per channel (max-abs / 127), the hidden
    tensor rounded to uint8 with the given parameters, everything else exact."""
    model = _outlier_model(outlier=1.0)
    _, calibration = qcompiler.calibrate(qcompiler.api.load_model(model), _calib(8, 4))
    probe = SensitivityProbe(
        calibration, qcompiler.QuantConfig(), calibration.samples, tvm.target.Target("llvm"),
        output_psnr,
    )  # fmt: skip
    w1, w2 = (numpy_helper.to_array(i).astype(np.float64) for i in model.graph.initializer)

    def rounded(w):
        scale = np.abs(w).reshape(len(w), -1).max(axis=1).reshape(-1, 1, 1, 1) / 127
        return np.clip(np.rint(w / scale), -127, 127) * scale

    hidden = next(p.name for p in calibration.plan.points if p.name != "x")
    for scale, zero in ((0.05, 0), (0.2, 7), (0.013, 100)):
        reference, got = [], []
        for sample in calibration.samples:
            x = sample["x"].astype(np.float64)
            h = np.maximum(_conv1x1(x, rounded(w1)), 0)
            fake = (np.clip(np.round(h / scale) + zero, 0, 255) - zero) * scale
            exact = np.maximum(_conv1x1(x, w1), 0)
            reference.append([_conv1x1(exact, w2)])
            got.append([_conv1x1(fake, rounded(w2))])
        expected = output_psnr(reference, got)
        assert probe.run({hidden}, {hidden: (scale, zero)}) == pytest.approx(expected, abs=0.05)


def test_per_tensor_methods_are_checked_and_auto_needs_the_measurement():
    with pytest.raises(qcompiler.QCompilerError, match="unknown calibration method 'minimax'"):
        qcompiler.QuantConfig(tensor_methods=(("lv1", "minimax"),))
    _, calibration = qcompiler.calibrate(
        qcompiler.api.load_model(_outlier_model(1.0)), _calib(4, 4)
    )
    with pytest.raises(qcompiler.QCompilerError, match="measured with int16_activations='auto'"):
        qcompiler.quantize(None, None, qcompiler.QuantConfig(calibration="auto",
                           int16_activations=()), calibration=calibration)  # fmt: skip
    chosen = qcompiler.quantize(None, None, qcompiler.QuantConfig(calibration="auto"),
                                calibration=calibration)  # fmt: skip
    assert chosen.config.int16_activations == ()  # a model 8 bits serve: nothing measured
    config = qcompiler.QuantConfig(calibration="percentile", tensor_methods=(("lv1", "mse"),))
    assert config.range_method("lv1") == "mse" and config.range_method("lv2") == "percentile"
    assert qcompiler.QuantConfig(calibration="auto").range_method("lv2") == "minmax"


def _spread_model(depth: int):
    """x[1,4,8,8] -> ``depth`` x (Conv 1x1 -> Relu) -> y: every hidden tensor carries an
    outlier channel (times 40) that the next conv all but ignores, so each one's 8-bit rounding
    costs the output about as much as any other's: no share of them at 16 bits is enough."""
    rng = np.random.default_rng(7)
    nodes, inits, prev = [], [], "x"
    for k in range(depth):
        w = (np.eye(4) + rng.normal(scale=0.3, size=(4, 4)))[..., None, None].astype(np.float32)
        if k > 0:
            w[:, 0] /= 40.0  # reads the previous outlier channel at its usual scale
        if k < depth - 1:
            w[0] *= 40.0
        inits.append(numpy_helper.from_array(w, f"w{k}"))
        nodes.append(helper.make_node("Conv", [prev, f"w{k}"], [f"c{k}"]))
        nodes.append(helper.make_node("Relu", [f"c{k}"], [f"r{k}"]))
        prev = f"r{k}"
    nodes[-1] = helper.make_node("Identity", [f"c{depth - 1}"], ["y"])
    graph = helper.make_graph(
        nodes,
        "spread",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_default_widens_every_activation_when_no_share_is_enough():
    model = _spread_model(depth=12)
    imported, calibration = qcompiler.calibrate(qcompiler.api.load_model(model), _calib(16, 4))
    default = qcompiler.quantize(imported, None, calibration=calibration)
    choice = default.activation_choice
    assert choice.widened and choice.capped_db < choice.weights_db - 3
    assert 0 < len(choice.capped) < len(calibration.observers)
    costly = [n for n, db in choice.alone_db.items() if db <= choice.weights_db - 1]
    assert len(costly) > len(choice.capped)  # the cap cut the share
    assert set(default.config.int16_activations) == {p.name for p in calibration.observers}
    assert default.config.weight_rounding == "optimized"  # on the kept samples' statistics
    manifest = default.build().manifest["quantization"]
    assert manifest["weight_rounding"] == "optimized"
    assert manifest["activations_measured"]["widened"]

    def build(**kw):
        config = qcompiler.QuantConfig(**kw)
        return qcompiler.quantize(imported, None, config, calibration=calibration).build()

    tests = _calib(4, 5)
    capped = _error(model, build(int16_activations=choice.capped), tests)
    nearest = build(weight_rounding="nearest")  # the user's explicit rounding wins
    assert nearest.manifest["quantization"]["weight_rounding"] == "nearest"
    assert _error(model, nearest, tests) < capped / 5
    assert _error(model, default.build(), tests) < _error(model, nearest, tests)


def test_auto_rounding_optimizes_4_bit_layers_and_8_bit_ones_that_saw_enough_patches():
    """``weight_rounding="auto"`` resolves to ``optimized-4bit`` where there are 4-bit layers
    (``nearest`` where there are none). Below 8 patches per patch value (the 3x3 conv: 72
    values, 36 patches per sample, the first PROBE_HOLDOUT samples left out), 8-bit weights
    round to nearest and 4-bit ones against the shrunk moment."""
    model = qcompiler.api.load_model(head_model())
    convs = [
        b
        for b in bindings(qcompiler.calibrate(model, samples(1))[1].mod["main"])
        if op_name(b.value) == "relax.nn.conv2d"
    ]
    conv = next(b.var.name for b in convs if const_value(b.value.args[1]).shape[1] == 3)
    others = tuple(b.var.name for b in convs if b.var.name != conv)
    tests = samples(2, seed=9)

    def outputs(count, **kw):
        imported, calibration = qcompiler.calibrate(model, samples(count), layer_inputs=True)
        config = qcompiler.QuantConfig(int16_activations=(), **kw)
        quantized = qcompiler.quantize(imported, None, config, calibration=calibration)
        artifact = quantized.build()
        rounding = artifact.manifest["quantization"]["weight_rounding"]
        return rounding, [artifact.run(s)["output"] for s in tests]

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(a, b))

    enough = PROBE_HOLDOUT + 16  # 576 patches after the held-out samples: 8 per value
    assert outputs(enough)[0] == "nearest"
    rounding, optimized = outputs(enough, int4_weights=(conv,))
    assert rounding == "optimized-4bit"
    _, nearest = outputs(enough, int4_weights=(conv,), weight_rounding="nearest")
    assert not same(optimized, nearest)
    # 15 samples hold none out (fewer than twice PROBE_HOLDOUT): 540 patches
    _, eight_bit = outputs(15, weight_rounding="optimized", nearest_weights=others)
    assert same(eight_bit, outputs(15, weight_rounding="nearest")[1])
    _, shrunk = outputs(15, int4_weights=(conv,))
    assert not same(shrunk, outputs(15, int4_weights=(conv,), weight_rounding="nearest")[1])


def _mlp(w1, b1, w2, b2):
    """``relu(x @ w1 + b1) @ w2 + b2`` as an ONNX model."""
    inits = [numpy_helper.from_array(a.astype(np.float32), n)
             for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w1.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w2.shape[1]])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hessian_probe_matches_the_gauss_newton_trace_in_numpy():
    """HAWQ's proxy on a two-layer MLP, against the trace of ``JᵀJ`` written out in numpy
    (the loss is the output noise over the output power, so at the float weights its Hessian
    is the Gauss-Newton matrix): for ``y = relu(x W1 + b1) W2 + b2`` with ``m`` the ReLU's
    mask, ``Tr_W1 = sum_s |x_s|² sum_k m_sk |W2[k, :]|²`` and ``Tr_W2 = sum_s |h_s|² · C``,
    both over ``sum y²``. The noise of a finite perturbation is checked exactly first."""
    rng = np.random.default_rng(3)
    w1, b1 = rng.normal(size=(16, 12)), 0.3 * rng.normal(size=12)
    w2, b2 = rng.normal(size=(12, 6)) / 3, 0.1 * rng.normal(size=6)
    xs = rng.normal(size=(6, 1, 16))
    model = _mlp(w1, b1, w2, b2)
    calib = [{"x": x.astype(np.float32)} for x in xs]
    _, calibration = qcompiler.calibrate(qcompiler.api.load_model(model), calib)
    probe = qcompiler.api.hessian_probe(calibration, None, calib, probes=600)
    assert len(probe.names) == 2

    def forward(a, b):
        h = np.maximum(xs[:, 0] @ a + b1, 0)
        return h, h @ b + b2

    h, y = forward(w1, w2)
    power = (y**2).sum()
    # the noise of a finite move of the first layer, exact
    move = 0.05 * rng.normal(size=w1.shape)
    stored = move if probe._weights[0].shape == w1.shape else move.T  # as the importer keeps it
    moved = forward(w1 + move, w2)[1]
    assert probe.noise(0, stored) == pytest.approx(((moved - y) ** 2).sum() / power, rel=1e-4)
    # the 8-bit rounding error of the second layer: symmetric per output channel (column)
    w = w2.astype(np.float32).astype(np.float64)
    scale = np.abs(w).max(axis=0) / 127
    error = ((np.clip(np.rint(w / scale), -127, 127) * scale - w) ** 2).sum()
    assert probe.rounding_error[1][0] == pytest.approx(error, rel=1e-3)

    mask = h > 0
    trace_w1 = ((xs[:, 0] ** 2).sum(1) * (mask * (w2**2).sum(1)).sum(1)).sum() / power
    trace_w2 = (h**2).sum() * w2.shape[1] / power
    assert probe.curvature(0) * w1.size == pytest.approx(trace_w1, rel=0.1)
    assert probe.curvature(1) * w2.size == pytest.approx(trace_w2, rel=0.1)

    # the predicted noise of each layer's 4-bit rounding: its curvature times the squared error
    alone, base = probe.measure()
    eight = [probe.curvature(k) * probe.rounding_error[k][0] for k in range(2)]
    four = probe.curvature(0) * probe.rounding_error[0][1]
    assert base == pytest.approx(-10 * np.log10(sum(eight)), rel=1e-9)
    assert alone[probe.names[0]] == pytest.approx(-10 * np.log10(four + eight[1]), rel=1e-9)
