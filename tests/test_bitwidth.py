"""The bit-width ILP against exhaustive search over every assignment (the independent reference),
and its errors for budgets no assignment meets."""

import itertools

import numpy as np
import pytest

from qcompiler.api import within_drop
from qcompiler.passes.errors import QCompilerError
from qcompiler.targets.bitwidth import Option, choose_precisions, size_ladder

PRECISIONS = ("w4a8", "w8a8", "w8a16", "float")


def random_table(seed: int, layers: int = 6) -> dict[str, list[Option]]:
    """Costs shaped like real ones: fewer bits are faster and smaller but noisier."""
    rng = np.random.default_rng(seed)
    table = {}
    for i in range(layers):
        params = int(rng.integers(1_000, 50_000))
        base = float(rng.uniform(0.1, 2.0))
        sensitivity = float(rng.uniform(0.01, 1.0))
        table[f"layer{i}"] = [
            Option("w4a8", base * rng.uniform(0.7, 1.0), 16 * sensitivity, params // 2),
            Option("w8a8", base, sensitivity, params),
            Option("w8a16", base * rng.uniform(1.2, 1.8), sensitivity / 50, params),
            Option("float", base * rng.uniform(3.0, 5.0), 0.0, 4 * params),
        ]
    return table


def exhaustive(table, minimize, budgets, ties=()):
    """The best assignment by enumeration, or None when none fits."""
    layers = list(table)
    best, best_cost = None, np.inf
    for picks in itertools.product(*(table[layer] for layer in layers)):
        chosen = dict(zip(layers, picks))
        if any(len({chosen[name].precision for name in group}) > 1 for group in ties):
            continue
        totals = {q: sum(getattr(o, q) for o in picks) for q in ("latency_ms", "error", "bytes")}
        if any(totals[q] > limit + 1e-9 for q, limit in budgets.items()):
            continue
        if totals[minimize] < best_cost - 1e-12:
            best, best_cost = {k: v.precision for k, v in chosen.items()}, totals[minimize]
    return best, best_cost


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "minimize, budget",
    [("latency_ms", "error"), ("bytes", "error"), ("error", "latency_ms"), ("error", "bytes")],
)
def test_ilp_finds_the_exhaustive_optimum(seed, minimize, budget):
    table = random_table(seed)
    # a budget between the extremes, so that it binds
    lowest = sum(min(getattr(o, budget) for o in options) for options in table.values())
    highest = sum(max(getattr(o, budget) for o in options) for options in table.values())
    limit = lowest + 0.3 * (highest - lowest)
    keyword = {"error": "max_error", "latency_ms": "max_latency_ms", "bytes": "max_bytes"}
    plan = choose_precisions(table, minimize=minimize, **{keyword[budget]: limit})
    expected, cost = exhaustive(table, minimize, {budget: limit})
    assert expected is not None
    assert getattr(plan, minimize) == pytest.approx(cost, rel=1e-9)
    # the plan's totals are those of the precisions it names (optima may tie: w8a8 and w8a16
    # store the same bytes)
    picked = [next(o for o in table[k] if o.precision == p) for k, p in plan.precisions.items()]
    assert getattr(plan, budget) == pytest.approx(sum(getattr(o, budget) for o in picked))
    assert getattr(plan, budget) <= limit + 1e-9


def test_tied_layers_share_a_precision():
    table = random_table(11, layers=5)
    ties = [("layer0", "layer3"), ("layer1", "layer2", "layer4")]
    limit = sum(o[1].error for o in table.values())  # as noisy as all-w8a8
    plan = choose_precisions(table, max_error=limit, ties=ties)
    expected, cost = exhaustive(table, "latency_ms", {"error": limit}, ties)
    assert plan.precisions == expected and plan.latency_ms == pytest.approx(cost)
    assert plan.precisions["layer0"] == plan.precisions["layer3"]
    assert len({plan.precisions[name] for name in ties[1]}) == 1


def test_a_precision_one_tied_layer_lacks_is_out_for_all():
    table = random_table(3, layers=2)
    table["layer1"] = [o for o in table["layer1"] if o.precision != "w4a8"]
    plan = choose_precisions(table, minimize="bytes", ties=[("layer0", "layer1")])
    assert plan.precisions["layer0"] == plan.precisions["layer1"] != "w4a8"


def test_hand_made_table_known_optimum():
    """Two layers; an error budget of 1.0 allows int4 on the insensitive one only."""
    table = {
        "conv1": [Option("w4a8", 1.0, 0.2, 50), Option("w8a8", 2.0, 0.1, 100)],
        "conv2": [Option("w4a8", 1.0, 5.0, 50), Option("w8a8", 2.0, 0.3, 100)],
    }
    plan = choose_precisions(table, max_error=1.0)
    assert plan.precisions == {"conv1": "w4a8", "conv2": "w8a8"}
    assert (plan.latency_ms, plan.error, plan.bytes) == (3.0, pytest.approx(0.5), 150)


def test_layers_reading_one_tensor_widen_it_together_and_ties_go_to_the_faster_plan():
    """The hand-made optimum: ``a`` and ``b`` read one tensor, so 16 bits for it costs both
    their time; among plans of equal bytes the second objective takes the fastest."""
    table = {
        "a": [Option("w8a8", 1.0, 0.0, 10), Option("w8a16", 2.0, -1.0, 10)],
        "b": [Option("w8a8", 1.0, 0.0, 10), Option("w8a16", 3.0, -1.0, 10)],
        "c": [Option("w8a8", 1.0, 0.0, 10), Option("w4a8", 1.0, 2.0, 5)]
        + [Option("w8a16", 2.0, -1.5, 10)],
    }
    tie = [("w8a16", ["a", "b"])]
    alone = choose_precisions(table, minimize="error", max_latency_ms=5.0)
    assert alone.precisions == {"a": "w8a16", "b": "w8a8", "c": "w8a16"}
    assert alone.error == pytest.approx(-2.5)
    tied = choose_precisions(table, minimize="error", max_latency_ms=5.0, precision_ties=tie)
    assert tied.precisions == {"a": "w8a8", "b": "w8a8", "c": "w8a16"}
    # 4 bits in c need the widened tensor to pay for their error: both readers widen it.
    plan = choose_precisions(table, minimize="bytes", max_error=0.0, precision_ties=tie)
    assert plan.precisions == {"a": "w8a16", "b": "w8a16", "c": "w4a8"} and plan.bytes == 25
    # With error to spare, widening buys nothing and the faster plan of 25 bytes is chosen.
    fast = choose_precisions(table, minimize="bytes", max_error=10.0, then="latency_ms")
    assert fast.precisions == {"a": "w8a8", "b": "w8a8", "c": "w4a8"} and fast.latency_ms == 3.0


def test_an_unreachable_budget_names_the_tightest_achievable_value():
    table = random_table(5, layers=4)
    smallest = sum(min(o.error for o in options) for options in table.values())
    assert smallest == 0.0  # float everywhere
    fastest = sum(min(o.latency_ms for o in options) for options in table.values())
    with pytest.raises(QCompilerError, match=rf"latency_ms <= 0.01 .* achievable is {fastest:g}"):
        choose_precisions(table, minimize="error", max_latency_ms=0.01)


def test_budgets_that_only_fail_together_say_so():
    table = {
        "a": [Option("w8a8", 1.0, 1.0), Option("float", 4.0, 0.0)],
        "b": [Option("w8a8", 1.0, 1.0), Option("float", 4.0, 0.0)],
    }
    # error 0 needs float everywhere (8 ms); 2 ms needs int8 everywhere (error 2)
    with pytest.raises(QCompilerError, match="together"):
        choose_precisions(table, max_error=0.5, max_latency_ms=2.5)


def test_bad_tables_are_clear_errors():
    with pytest.raises(QCompilerError, match="no candidate"):
        choose_precisions({"conv": []})
    with pytest.raises(QCompilerError, match="not in the table"):
        choose_precisions({"conv": [Option("w8a8", 1, 1)]}, ties=[("conv", "fc")])
    with pytest.raises(QCompilerError, match="minimize"):
        choose_precisions({"conv": [Option("w8a8", 1, 1)]}, minimize="speed")


def mnist_session(shared):
    """onnxruntime running the float MNIST model: the independent reference."""
    import onnxruntime as ort

    path = shared / "models" / "mnist_cnn" / "mnist_cnn.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def mnist_calibration(shared):
    import qcompiler

    data = np.load(shared / "data" / "mnist_test.npz")
    images = data["images"].astype(np.float32).reshape(-1, 1, 1, 28, 28)
    model = qcompiler.api.load_model(str(shared / "models" / "mnist_cnn" / "mnist_cnn.onnx"))
    model, calibration = qcompiler.calibrate(
        model, [{"Input3": x} for x in images[:50]], layer_inputs=True
    )
    return model, calibration, images, data["labels"]


def test_weight_options_from_calibration(mnist_calibration):
    from qcompiler.targets.bitwidth import weight_options

    _, calibration, _, _ = mnist_calibration
    table = weight_options(calibration)
    assert len(table) == 3
    for options in table.values():
        eight, four = options
        assert (eight.precision, four.precision) == ("w8a8", "w4a8")
        assert four.bytes == (eight.bytes + 1) // 2
        # 4 fewer bits: about 24 dB more noise (16x the step), give or take the rounding
        assert 0 < eight.error < four.error
        assert 50 < four.error / eight.error < 1000


def test_a_size_budget_is_met_by_the_built_model(mnist_calibration):
    import qcompiler

    model, calibration, images, labels = mnist_calibration
    eight = qcompiler.quantize(model, None, calibration=calibration).build("x86")
    budget = int(0.7 * eight.manifest["weight_bytes"])
    config, plan = qcompiler.api.choose_weight_precisions(calibration, max_bytes=budget)
    assert config.int4_weights and plan.bytes <= budget
    artifact = qcompiler.quantize(model, None, config, calibration=calibration).build("x86")
    assert artifact.manifest["weight_bytes"] == plan.bytes <= budget
    chosen = {t["layer"] for t in artifact.manifest["layers"] if t["precision"] == "w4a8"}
    assert chosen == set(config.int4_weights)

    def top1(art):
        scores = [next(iter(art.run({"Input3": x}).values())) for x in images[100:400]]
        return np.mean(np.argmax(np.concatenate(scores), axis=1) == labels[100:400])

    assert top1(artifact) >= top1(eight) - 0.02
    with pytest.raises(QCompilerError, match="bytes <= 100 cannot be met"):
        qcompiler.api.choose_weight_precisions(calibration, max_bytes=100)


def test_measured_choice_reports_the_probe_sqnr(mnist_calibration):
    import qcompiler

    model, calibration, images, _ = mnist_calibration
    samples = [{"Input3": x} for x in images[:4]]
    eight = qcompiler.quantize(model, None, calibration=calibration).build("x86")
    budget = int(0.7 * eight.manifest["weight_bytes"])
    config, plan = qcompiler.api.choose_weight_precisions(
        calibration, max_bytes=budget, samples=samples
    )
    assert plan.bytes <= budget and config.int4_weights
    assert plan.measured_sqnr_db is not None and 5 < plan.measured_sqnr_db < 60
    # a looser budget keeps more layers at 8 bits and measures at least as clean
    _, loose = qcompiler.api.choose_weight_precisions(
        calibration, max_bytes=int(0.9 * eight.manifest["weight_bytes"]), samples=samples
    )
    assert loose.measured_sqnr_db >= plan.measured_sqnr_db - 0.5


@pytest.fixture(scope="module")
def mnist_records(tmp_path_factory):
    """One tuning database for the latency tests: each kernel is measured once."""
    return tmp_path_factory.mktemp("records")


@pytest.mark.parametrize("wide", ["none", "one layer", "all"])
def test_layer_latencies_split_the_measured_model(mnist_calibration, mnist_records, wide):
    """Each conv/matmul layer gets its kernel's latency measured over RPC, and the layers plus
    the rest add up to meta-schedule's own estimate (its task weights x best latencies); a
    layer with int16 activations runs as two int8 kernels, both its own."""
    import qcompiler
    from qcompiler.passes.graph import CONV_OPS, MATMUL_OPS, bindings, op_name
    from qcompiler.targets.bitwidth import weight_options

    layer_ops = CONV_OPS | MATMUL_OPS
    model, calibration, _, _ = mnist_calibration
    # "lv2" is the second conv's input: one layer of two kernels between single ones
    int16 = {"none": (), "one layer": ("lv2",), "all": 1.0}[wide]
    config = {"int16_activations": int16}
    quantized = qcompiler.quantize(model, None, config, calibration=calibration)
    layers = [b.value for b in bindings(quantized.mod["main"]) if op_name(b.value) in layer_ops]
    int16_layers = sum(str(call.args[0].ty.dtype) == "int16" for call in layers)
    assert int16_layers == {"none": 0, "one layer": 1, "all": 3}[wide]
    measured = qcompiler.api.layer_latencies(quantized.mod, mnist_records, echo=lambda _: None)
    assert set(measured.layers) == set(weight_options(calibration))
    # A chain of layers: every kernel prepares one layer's input, so the rest may be empty.
    assert all(ms > 0 for ms in measured.layers.values()) and measured.rest_ms >= 0
    report = qcompiler.tune(quantized, mnist_records, trials=0, echo=lambda _: None)
    assert report.trials == 0  # everything came from the database
    assert measured.total_ms == pytest.approx(report.estimated_ms(), rel=1e-9)


def test_4_bit_unpacking_is_its_layers_latency(mnist_calibration, mnist_records):
    """The kernel that unpacks a layer's 4-bit weights before its call (through a reshape, no
    kernel of its own) is that layer's: with every layer at 4 bits the rest of the model
    costs what it costs at 8 bits, and the layers plus the rest still add up to
    meta-schedule's own estimate."""
    import qcompiler
    from qcompiler.targets.bitwidth import weight_layers

    model, calibration, _, _ = mnist_calibration
    quiet = {"echo": lambda _: None}
    measured = {}
    for bits, config in ((8, {}), (4, {"int4_weights": weight_layers(calibration)})):
        quantized = qcompiler.quantize(
            model, None, {"int16_activations": (), **config}, calibration=calibration
        )
        measured[bits] = qcompiler.api.layer_latencies(quantized.mod, mnist_records, **quiet)
    report = qcompiler.tune(quantized, mnist_records, trials=0, **quiet)
    assert measured[4].total_ms == pytest.approx(report.estimated_ms(), rel=1e-9)
    assert measured[4].rest_ms == pytest.approx(measured[8].rest_ms, abs=1e-9)


def test_a_latency_budget_is_planned_from_measured_layers(mnist_calibration, mnist_records):
    import qcompiler

    _, calibration, _, _ = mnist_calibration
    quiet = {"records": mnist_records, "echo": lambda _: None}
    # With room in the latency and no size budget, the least error is every layer at 8 bits.
    config, fast = qcompiler.api.choose_weight_precisions(calibration, max_latency_ms=1e3, **quiet)
    assert config.int4_weights == ()
    # A size budget then trades: 4-bit layers where the latency budget still allows them.
    eight_bytes = fast.bytes
    config, plan = qcompiler.api.choose_weight_precisions(
        calibration, max_bytes=int(0.6 * eight_bytes), max_latency_ms=10 * fast.latency_ms, **quiet
    )
    assert config.int4_weights and plan.bytes <= 0.6 * eight_bytes
    assert plan.latency_ms <= 10 * fast.latency_ms and plan.error > fast.error
    with pytest.raises(QCompilerError, match="latency_ms <= .* cannot be met"):
        qcompiler.api.choose_weight_precisions(
            calibration, max_latency_ms=0.5 * fast.latency_ms, **quiet
        )


def test_float_layers_compute_in_float(mnist_calibration, shared):
    """Layers kept float run as float fallbacks on their weights as trained: with every
    activation at 16 bits too, the outputs are onnxruntime's float ones up to the 16-bit
    rounding, far closer than all-8-bit's; the manifest counts their float32 bytes."""
    import qcompiler
    from qcompiler.targets.bitwidth import weight_layers

    model, calibration, images, _ = mnist_calibration
    layers = weight_layers(calibration)
    session = mnist_session(shared)
    samples = [{"Input3": x} for x in images[100:140]]
    expected = np.concatenate([session.run(None, x)[0] for x in samples])

    def sqnr(config) -> tuple[float, dict]:
        quantized = qcompiler.quantize(model, None, config, calibration=calibration)
        built = quantized.build("x86")
        got = np.concatenate([next(iter(built.run(x).values())) for x in samples])
        error = np.sum((got - expected) ** 2)
        return 10 * np.log10(np.sum(expected**2) / error), built.manifest

    eight_db, eight = sqnr({"int16_activations": ()})
    with pytest.warns(UserWarning, match="stay float"):
        float_db, floats = sqnr({"int16_activations": 1.0, "float_layers": layers})
    assert [t["precision"] for t in floats["layers"]] == ["float"] * len(layers)
    assert [t["layer"] for t in floats["layers"]] == [t["layer"] for t in eight["layers"]]
    assert floats["weight_bytes"] == 4 * eight["weight_bytes"]
    assert floats["quantization"]["float_layers"] == list(layers)
    assert len(floats["quantization"]["float_fallbacks"]) >= len(layers)
    assert float_db > eight_db + 20
    one = qcompiler.quantize(model, None, {"float_layers": layers[1:2]}, calibration=calibration)
    precisions = [t["precision"] for t in qcompiler.api.layer_table(one.mod)]
    assert precisions == ["w8a8", "float", "w8a8"]


def test_wider_precisions_are_chosen_by_what_they_measure(mnist_calibration, mnist_records, shared):
    """w8a16 and float beside w8a8/w4a8: with no more bytes than all-8-bit, the least error
    widens inputs (free in bytes) where their rounding costs the outputs, and the plan is
    what the build runs: each layer's precision in the manifest, the plan's bytes, and an
    output SQNR checked here against onnxruntime's float outputs."""
    import qcompiler

    model, calibration, images, _ = mnist_calibration
    samples = [{"Input3": x} for x in images[:6]]
    eight = qcompiler.quantize(model, None, calibration=calibration).build("x86")
    every = ("w8a8", "w4a8", "w8a16", "float")
    quiet = {"records": mnist_records, "echo": lambda _: None, "samples": samples}
    with pytest.raises(QCompilerError, match="w8a16 and float layers are priced by measurement"):
        qcompiler.api.choose_weight_precisions(calibration, max_bytes=1e6, precisions=every)
    config, plan = qcompiler.api.choose_weight_precisions(
        calibration, max_bytes=eight.manifest["weight_bytes"], precisions=every, **quiet
    )
    assert plan.bytes <= eight.manifest["weight_bytes"] and plan.error < 0
    assert "w8a16" in plan.precisions.values()
    built = qcompiler.quantize(model, None, config, calibration=calibration).build("x86")
    assert {t["layer"]: t["precision"] for t in built.manifest["layers"]} == plan.precisions
    assert built.manifest["weight_bytes"] == plan.bytes
    session = mnist_session(shared)
    expected = np.concatenate([session.run(None, x)[0] for x in samples])
    got = np.concatenate([next(iter(built.run(x).values())) for x in samples])
    sqnr = 10 * np.log10(np.sum(expected**2) / np.sum((got - expected) ** 2))
    assert plan.measured_sqnr_db == pytest.approx(sqnr, abs=0.05)
    # Room for float32 weights: the least error keeps weights float, and measures cleaner.
    config, roomy = qcompiler.api.choose_weight_precisions(
        calibration, max_bytes=4 * eight.manifest["weight_bytes"], precisions=every, **quiet
    )
    assert config.float_layers == roomy.layers_at("float") != ()
    assert roomy.measured_sqnr_db > plan.measured_sqnr_db


def test_an_accuracy_budget_is_met_when_scored(mnist_calibration, shared):
    """The chosen weights score within the budget of the float model on the samples searched
    and on those held out, both scored here independently: the float model by onnxruntime, the
    chosen build by its own outputs."""
    import qcompiler

    model, calibration, images, labels = mnist_calibration
    labelled = [({"Input3": x}, int(y)) for x, y in zip(images[100:400], labels[100:400])]
    probe = [{"Input3": x} for x in images[:4]]
    search = qcompiler.api.choose_within_accuracy_drop(
        model, calibration, labelled, 1.0, samples=probe
    )
    config, plan, tried = search.config, search.plan, search.tried
    session = mnist_session(shared)
    float_hits = np.array([np.argmax(session.run(None, x)[0]) == y for x, y in labelled])
    built = qcompiler.quantize(model, None, config, calibration=calibration).build("x86")
    hits = np.array([np.argmax(next(iter(built.run(x).values()))) == y for x, y in labelled])
    # Every other sample is searched on, the rest hold the choice to the budget.
    assert (search.searched, search.held_out) == (150, 150)
    for part in (slice(0, None, 2), slice(1, None, 2)):
        assert 100 * (float_hits[part].mean() - hits[part].mean()) <= 1.0
    assert search.reference == pytest.approx(float_hits[0::2].mean())
    assert search.held_out_reference == pytest.approx(float_hits[1::2].mean())
    assert search.chosen.top1 == pytest.approx(hits[0::2].mean())
    assert search.chosen.held_out_top1 == pytest.approx(hits[1::2].mean())
    eight = max(tried, key=lambda c: c.bytes)
    assert eight.int4_weights == () and plan.bytes <= eight.bytes
    # Whichever rounding a candidate had, none smaller than the choice was within budget on
    # both parts.
    assert all(
        c.bytes >= plan.bytes
        or 100 * (search.reference - c.top1) > 1.0
        or 100 * (search.held_out_reference - c.held_out_top1) > 1.0
        for c in tried
    )
    assert config.weight_rounding in qcompiler.api.accuracy_search_roundings(calibration)
    assert search.chosen in tried and search.chosen.bytes == plan.bytes
    with pytest.raises(QCompilerError, match="top-1 drop <= -5 points cannot be met") as caught:
        qcompiler.api.choose_within_accuracy_drop(model, calibration, labelled, -5.0, samples=probe)
    # What was measured goes with the error: the all-8-bit build, the one candidate tried.
    assert [c.int4_weights for c in caught.value.tried] == [()]
    assert caught.value.reference == search.reference


def test_an_accuracy_search_steps_up_to_a_plan_the_held_out_samples_confirm(
    mnist_calibration, shared
):
    """Held out: samples that the float model (onnxruntime) and the all-8-bit build get right
    and the all-4-bit build gets wrong; searched: samples all three get right. The search finds
    all-4-bit within budget on what it searched, and must step up its ladder to a plan that
    holds on the held-out samples too."""
    import qcompiler
    from qcompiler.passes.scheme import QuantConfig
    from qcompiler.targets.bitwidth import weight_options

    model, calibration, images, labels = mnist_calibration
    session = mnist_session(shared)
    pool = [({"Input3": x}, int(y)) for x, y in zip(images[100:1100], labels[100:1100])]
    layers = tuple(weight_options(calibration))

    def right(int4=None):
        if int4 is None:
            return np.array([np.argmax(session.run(None, x)[0]) == y for x, y in pool])
        config = QuantConfig(int4_weights=int4)
        built = qcompiler.quantize(model, None, config, calibration=calibration).build("x86")
        return np.array([np.argmax(next(iter(built.run(x).values()))) == y for x, y in pool])

    fp32, eight, four = right(), right(()), right(layers)
    hard = [pool[i] for i in np.flatnonzero(fp32 & eight & ~four)]
    easy = [pool[i] for i in np.flatnonzero(fp32 & eight & four)]
    assert hard, "the all-4-bit build must miss some sample that 8 bits get right"
    count = min(len(hard), 10)
    labelled = [sample for pair in zip(easy[:count], hard[:count]) for sample in pair]
    probe = [{"Input3": x} for x in images[:4]]
    search = qcompiler.api.choose_within_accuracy_drop(
        model, calibration, labelled, 1.0, samples=probe
    )
    assert search.searched == search.held_out == count
    assert search.reference == search.held_out_reference == 1.0
    within = [c for c in search.tried if c.top1 == 1.0]
    assert min(c.bytes for c in within) < search.chosen.bytes, "it stepped up"
    assert search.chosen.top1 == search.chosen.held_out_top1 == 1.0
    built = qcompiler.quantize(model, None, search.config, calibration=calibration).build("x86")
    assert all(np.argmax(next(iter(built.run(x).values()))) == y for x, y in labelled)


def test_an_accuracy_search_tries_nearest_beside_optimized_4_bit_rounding(mnist_calibration):
    """``auto`` rounds 4-bit layers against their inputs where they saw enough patches; the
    accuracy search then also tries nearest rounding. A rounding the user names is kept."""
    from qcompiler.api import accuracy_search_roundings
    from qcompiler.passes.scheme import QuantConfig

    _, calibration, _, _ = mnist_calibration
    assert accuracy_search_roundings(calibration) == ("auto", "nearest")
    for named in ("nearest", "optimized", "optimized-4bit"):
        assert accuracy_search_roundings(calibration, QuantConfig(weight_rounding=named)) == (
            named,
        )


def test_each_layer_rounds_the_way_its_4_bit_error_measured_lower(mnist_calibration):
    """``per_layer_rounding`` rounds to nearest the layers whose 4-bit error the probe measured
    lower that way; the probe and the build honour ``nearest_weights`` layer by layer."""
    import qcompiler
    from qcompiler.api import per_layer_rounding, weight_probe
    from qcompiler.passes.scheme import QuantConfig

    model, calibration, images, _ = mnist_calibration
    probe = [{"Input3": x} for x in images[:4]]
    optimized = weight_probe(calibration, QuantConfig(), probe).measure()
    nearest = weight_probe(calibration, QuantConfig(weight_rounding="nearest"), probe).measure()
    layers = list(optimized[0])
    assert optimized[1] == nearest[1]  # 8-bit layers round to nearest either way
    mixed, (errors, base) = per_layer_rounding(QuantConfig(), optimized, nearest)
    assert set(mixed.nearest_weights) == {n for n in layers if nearest[0][n] > optimized[0][n]}
    assert base == optimized[1]
    # Each layer alone at 4 bits measures, rounded the mixed way, the better of the two.
    mixed_alone, _ = weight_probe(calibration, mixed, probe).measure()
    for layer in layers:
        assert errors[layer] == max(optimized[0][layer], nearest[0][layer])
        assert mixed_alone[layer] == pytest.approx(errors[layer], abs=1e-6)

    def outputs(**kw):
        config = QuantConfig(int4_weights=tuple(layers), **kw)
        built = qcompiler.quantize(model, None, config, calibration=calibration).build("x86")
        return built, [next(iter(built.run(x).values())) for x in probe]

    _, rounded = outputs(weight_rounding="nearest")
    _, fitted = outputs()
    built, named = outputs(nearest_weights=tuple(layers))
    assert any(not np.array_equal(a, b) for a, b in zip(rounded, fitted))
    assert all(np.array_equal(a, b) for a, b in zip(rounded, named))
    assert built.manifest["quantization"]["nearest_weights"] == layers
    with pytest.raises(QCompilerError, match="nearest_weights name \\['nope'\\]"):
        qcompiler.quantize(
            model, None, QuantConfig(nearest_weights=("nope",)), calibration=calibration
        )


@pytest.mark.parametrize("measure", ["sqnr", "psnr"])
def test_an_output_budget_is_met_when_measured(mnist_calibration, shared, measure):
    """``choose_within_output_db`` (no labels): the chosen build's output SQNR or PSNR against
    onnxruntime's float outputs, computed here in numpy on the samples it measured, is at the
    budget; every smaller candidate measured under it; a budget over all-8-bit's names it."""
    import qcompiler
    from qcompiler.api import choose_within_output_db
    from qcompiler.passes.scheme import QuantConfig
    from qcompiler.targets.bitwidth import weight_options

    model, calibration, images, _ = mnist_calibration
    probe = [{"Input3": x} for x in images[:4]]
    measure_on = [{"Input3": x} for x in images[100:132]]  # not calibration samples
    session = mnist_session(shared)
    reference = np.stack([session.run(None, x)[0] for x in measure_on]).astype(np.float64)

    def db(config) -> float:  # 32 rows of 10 logits: one column
        built = qcompiler.quantize(model, None, config, calibration=calibration).build("x86")
        got = np.stack([next(iter(built.run(x).values())) for x in measure_on])
        noise = ((reference - got) ** 2).mean()
        power = (reference**2).mean() if measure == "sqnr" else np.abs(reference).max() ** 2
        return 10 * np.log10(power / noise)

    layers = tuple(weight_options(calibration))
    eight, four = db(QuantConfig()), db(QuantConfig(int4_weights=layers))
    assert four < eight - 3, "4-bit weights must cost the outputs something measurable"
    budget = (eight + four) / 2

    def search(min_db):
        return choose_within_output_db(
            model, calibration, min_db, samples=probe, measure=measure, measure_on=measure_on
        )

    found = search(budget)
    assert found.measured_on == len(measure_on) and found.measure == measure
    assert db(found.config) >= budget
    assert found.chosen.db == pytest.approx(db(found.config), abs=0.05)
    assert 0 < len(found.config.int4_weights) < len(layers)
    assert found.chosen in found.tried and found.plan.bytes == found.chosen.bytes
    assert all(c.db < budget for c in found.tried if c.bytes < found.chosen.bytes)
    with pytest.raises(QCompilerError, match="all weights at 8 bits measure"):
        search(eight + 1)


def test_an_output_budget_over_all_8_bit_is_met_by_wider_layers(
    mnist_calibration, mnist_records, shared
):
    """With ``w8a16`` and ``float`` among the precisions, an output SQNR budget above
    all-8-bit's (halfway to every layer's weights float), which the 4-bit search refuses
    naming all-8-bit's value, is met by a build
    that widens inputs or keeps weights float: its SQNR against onnxruntime's float outputs,
    computed here, reaches the budget, and its manifest runs the plan's precisions; so does
    the plan predicted fastest (``minimize="latency_ms"``). A budget beyond every plan names
    the most accurate plan's value."""
    import qcompiler
    from qcompiler.api import choose_within_output_db
    from qcompiler.passes.scheme import QuantConfig
    from qcompiler.targets.bitwidth import weight_layers

    model, calibration, images, _ = mnist_calibration
    probe = [{"Input3": x} for x in images[:4]]
    measure_on = [{"Input3": x} for x in images[100:132]]  # not calibration samples
    session = mnist_session(shared)
    reference = np.stack([session.run(None, x)[0] for x in measure_on]).astype(np.float64)

    def built(config):
        return qcompiler.quantize(model, None, config, calibration=calibration).build("x86")

    def sqnr(artifact) -> float:
        got = np.stack([next(iter(artifact.run(x).values())) for x in measure_on])
        return 10 * np.log10((reference**2).mean() / ((reference - got) ** 2).mean())

    eight = sqnr(built(QuantConfig()))
    floated = sqnr(built(QuantConfig(float_layers=weight_layers(calibration))))
    assert floated > eight + 1, "float weights must measure cleaner"
    budget = (eight + floated) / 2
    quiet = {"samples": probe, "measure_on": measure_on}
    with pytest.raises(QCompilerError, match="all weights at 8 bits measure .* allow w8a16"):
        choose_within_output_db(model, calibration, budget, **quiet)
    every = {"precisions": ("w8a8", "w4a8", "w8a16", "float"), "records": mnist_records}
    found = choose_within_output_db(
        model, calibration, budget, **quiet, **every, echo=lambda _: None
    )
    chosen = built(found.config)
    assert sqnr(chosen) >= budget
    assert found.chosen.db == pytest.approx(sqnr(chosen), abs=0.05)
    assert found.chosen.w8a16_layers or found.chosen.float_layers
    assert {t["layer"]: t["precision"] for t in chosen.manifest["layers"]} == (
        found.plan.precisions
    )
    assert chosen.manifest["weight_bytes"] == found.plan.bytes == found.chosen.bytes
    # The fastest instead of the smallest: it holds the budget too, and every candidate it
    # tried that is predicted faster measured under it.
    fastest = choose_within_output_db(
        model, calibration, budget, **quiet, **every, minimize="latency_ms", echo=lambda _: None
    )
    assert sqnr(built(fastest.config)) >= budget
    assert fastest.chosen.latency_ms == pytest.approx(fastest.plan.latency_ms)
    faster = [c for c in fastest.tried if c.latency_ms < fastest.chosen.latency_ms]
    assert all(c.db < budget for c in faster)
    with pytest.raises(QCompilerError, match="the most accurate plan .* measures"):
        choose_within_output_db(model, calibration, 200.0, **quiet, **every, echo=lambda _: None)


def test_pareto_front_keeps_the_points_nothing_beats():
    from qcompiler.report import Point, pareto_front

    def p(ms, db):
        return Point((), 0, ms, db)

    points = [p(1.0, 10), p(2.0, 20), p(1.5, 5), p(3.0, 20), p(2.5, 30), p(1.0, 8)]
    front = pareto_front(points, lambda q: q.sqnr_db)
    assert [(q.latency_ms, q.sqnr_db) for q in front] == [(1.0, 10), (2.0, 20), (2.5, 30)]


def test_report_measures_layers_and_traces_candidates(mnist_calibration, mnist_records, tmp_path):
    import qcompiler
    from qcompiler import report
    from qcompiler.targets.bitwidth import weight_layers

    model, calibration, images, _ = mnist_calibration
    eight = qcompiler.quantize(model, None, calibration=calibration).build("x86")
    budget = int(0.75 * eight.manifest["weight_bytes"])
    measured = report.mixed_precision_report(
        model,
        calibration,
        samples=[{"Input3": x} for x in images[:4]],
        records=mnist_records,
        max_bytes=budget,
        echo=lambda _: None,
    )
    assert [row.name for row in measured.layers] == list(weight_layers(calibration))
    assert all(row.ms["w8a8"] > 0 and row.ms["w4a8"] > 0 for row in measured.layers)
    assert all(row.curvature > 0 and np.isfinite(row.hawq_4bit_db) for row in measured.layers)
    by_size = sorted(measured.points, key=lambda p: p.bytes)
    assert by_size[-1].int4_weights == () and by_size[0].bytes < by_size[-1].bytes
    assert by_size[-1].sqnr_db == pytest.approx(measured.base_sqnr_db)
    # a candidate's bytes are what its build stores
    smallest = by_size[0]
    config = qcompiler.api.QuantConfig(int4_weights=smallest.int4_weights)
    built = qcompiler.quantize(model, None, config, calibration=calibration).build("x86")
    assert built.manifest["weight_bytes"] == smallest.bytes
    assert measured.chosen is not None and measured.chosen.bytes <= budget
    text, png = report.write(measured, tmp_path / "report")
    assert "| lv4 |" in text.read_text() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_drop_of_exactly_the_budget_is_within_it():
    # EfficientNet-Lite0 on 400 images: fp32 350 right, a candidate 346 (-1.00 points)
    assert within_drop(350 / 400, 346 / 400, 1.0)
    assert not within_drop(350 / 400, 345 / 400, 1.0)
    assert within_drop(0.5, 0.6, 0.0)  # a gain is within any budget


@pytest.mark.parametrize("factor", [2.0, 2**0.5])
def test_size_ladder_rungs_are_the_fewest_bytes_within_each_budget(factor):
    """Each rung of the ladder has the fewest bytes that exhaustive search finds within its
    error budget (all-4-bit's total divided by ``factor`` per step); the rungs are the distinct
    plans, smallest first, ending at the least error; a finer factor finds every plan of the
    coarser ladder and more between them."""
    # w4a8 and w8a8, errors added to all-8-bit's as weight_options gives them
    table = {
        k: [four, Option("w8a8", eight.latency_ms, 0.0, eight.bytes)]
        for k, (four, eight, *_) in random_table(3, layers=8).items()
    }
    everything = sum(max(o.error for o in options) for options in table.values())
    steps = int(round(8 * np.log(2) / np.log(factor)))
    ladder = size_ladder(table, steps=steps, factor=factor)
    sizes = [plan.bytes for plan in ladder]
    assert sizes == sorted(set(sizes))
    assert ladder[-1].error == pytest.approx(0.0)
    for step in range(steps):
        budget = everything / factor**step
        _, fewest = exhaustive(table, "bytes", {"error": budget})
        assert fewest in sizes
    if factor < 2:
        coarse = {plan.bytes for plan in size_ladder(table, steps=8, factor=2.0)}
        assert coarse < set(sizes)


@pytest.mark.parametrize("minimize", ["bytes", "latency_ms"])
def test_a_ladder_with_wider_options_goes_past_all_8_bit(minimize):
    """With options that remove noise (errors relative to all-8-bit, as the searches price
    ``w8a16`` and ``float``), every rung is the exhaustive optimum of ``minimize`` at its own
    error, the rungs run cheapest first with the error falling, some remove noise, and the
    last is the least error any assignment reaches."""
    table = {}
    for layer, options in random_table(4, layers=5).items():
        zero = next(o.error for o in options if o.precision == "w8a8")
        table[layer] = [Option(o.precision, o.latency_ms, o.error - zero, o.bytes) for o in options]
    then = "bytes" if minimize == "latency_ms" else "latency_ms"
    ladder = size_ladder(table, steps=8, factor=2**0.5, minimize=minimize, then=then)
    for plan in ladder:
        _, cost = exhaustive(table, minimize, {"error": plan.error})
        assert getattr(plan, minimize) == pytest.approx(cost, rel=1e-9)
    costs = [getattr(plan, minimize) for plan in ladder]
    assert costs == sorted(costs)
    assert all(a.error > b.error for a, b in zip(ladder, ladder[1:]))
    assert any(plan.error < 0 for plan in ladder)
    _, least = exhaustive(table, "error", {})
    assert ladder[-1].error == pytest.approx(least)


def test_the_solver_prints_nothing_on_standard_output(capfd):
    """HiGHS writes a debug line to file descriptor 1 from C++ now and then; the program's
    solve runs with it pointed elsewhere, and restores it."""
    import os

    from qcompiler.targets.bitwidth import _silenced_stdout

    with _silenced_stdout():
        os.write(1, b"HighsMipSolverData::transformNewIntegerFeasibleSolution\n")
    os.write(1, b"after\n")
    assert capfd.readouterr().out == "after\n"


def test_a_size_budget_rounds_each_4_bit_layer_its_better_way(shared):
    """Under the default rounding a weight budget's 4-bit layers are rounded each the way
    the weight probe measured its 4-bit error lower, as the accuracy search's third ladder
    does: calibrated on 3 images, MNIST's classifier is better rounded to nearest than
    against its inputs, the two convs are not. The build runs that mix."""
    import qcompiler
    from qcompiler.api import weight_probe
    from qcompiler.passes.scheme import QuantConfig

    data = np.load(shared / "data" / "mnist_test.npz")
    images = data["images"].astype(np.float32).reshape(-1, 1, 1, 28, 28)
    model = qcompiler.api.load_model(str(shared / "models" / "mnist_cnn" / "mnist_cnn.onnx"))
    with pytest.warns(UserWarning, match="calibrated on 3 sample"):
        model, calibration = qcompiler.calibrate(
            model, [{"Input3": x} for x in images[:3]], layer_inputs=True
        )
    samples = [{"Input3": x} for x in images[100:108]]
    optimized, _ = weight_probe(calibration, QuantConfig(), samples).measure()
    nearest, _ = weight_probe(
        calibration, QuantConfig(weight_rounding="nearest"), samples
    ).measure()
    better_nearest = {n for n in optimized if nearest[n] > optimized[n]}
    assert 0 < len(better_nearest) < len(optimized)  # the case this test is about

    eight = qcompiler.quantize(model, None, calibration=calibration).build("x86")
    budget = eight.manifest["weight_bytes"] // 2 + 64  # every layer at 4 bits
    config, plan = qcompiler.api.choose_weight_precisions(
        calibration, max_bytes=budget, samples=samples
    )
    assert set(config.int4_weights) == set(optimized)
    assert set(config.nearest_weights) == better_nearest
    assert (
        plan.measured_sqnr_db
        >= max(
            weight_probe(calibration, QuantConfig(weight_rounding=r), samples).run(set(optimized))
            for r in ("auto", "nearest")
        )
        - 0.5
    )
    built = qcompiler.quantize(model, None, config, calibration=calibration).build("x86")
    assert set(built.manifest["quantization"]["nearest_weights"]) == better_nearest
