"""``qc``: the command line, in tvmc's style. It only parses arguments and calls the API.

qc compile MODEL [--calib DATA] --target BOARD [--tuning-records DIR] [--cross-compiler CXX] -o OUT
qc tune MODEL --calib DATA --target BOARD --trials N [--rpc-tracker HOST:PORT --rpc-key KEY] -o DIR
qc run OUT [--inputs X.npz] [--output Y.npz [--resume]] [--rpc-tracker HOST:PORT --rpc-key KEY]
qc eval MODEL --calib DATA --data DATA --metric top1|map50|miou|pooled_iou
qc targets                     the boards (x86, rpi4, rpi5, jetson-orin-nano, ...) and their targets
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from qcompiler import api
from qcompiler.data import Preprocess, labelled_images, load_calibration, save_npz_stream
from qcompiler.evaluate import paired_difference
from qcompiler.passes.errors import QCompilerError
from qcompiler.passes.scheme import (
    AUTO,
    AUTO_METHOD,
    CALIBRATION_METHODS,
    PRESETS,
    WEIGHT_ROUNDINGS,
    CalibConfig,
    QuantConfig,
)
from qcompiler.targets.boards import boards, resolve_board, target_json
from qcompiler.targets.tuning import RPCEndpoint


def _config(args) -> QuantConfig:
    return QuantConfig(
        args.scheme,
        CalibConfig(args.calib_method, args.percentile),
        _int16(args.int16),
        weight_rounding=args.weight_rounding,
        bias_correction=args.bias_correction,
        equalize=args.equalize,
        int4_weights=tuple(n.strip() for n in (args.int4 or "").split(",") if n.strip()),
    )


def _int16(text: str | None):
    """``--int16``: ``auto`` (the default), ``none``, a share of the activations (``0.05``) or
    tensor names (``lv12,lv40``)."""
    if not text or text == AUTO:
        return AUTO
    if text == "none":
        return ()
    try:
        return float(text)
    except ValueError:
        return tuple(name.strip() for name in text.split(",") if name.strip())


def _preprocess(args):
    return Preprocess.parse(args.preprocess) if args.preprocess else None


def _board(args):
    return resolve_board(args.target, args.boards)


def cmd_compile(args) -> int:
    board = _board(args)
    confirm = None
    budgets = args.size_budget_kb is not None or args.latency_budget_ms is not None
    accuracy = {
        flag: value
        for flag, value in (
            ("--max-accuracy-drop", args.max_accuracy_drop),
            ("--min-sqnr-db", args.min_sqnr_db),
            ("--min-psnr-db", args.min_psnr_db),
        )
        if value is not None
    }
    if args.minimize != "size" and not accuracy:
        raise QCompilerError(
            "--minimize goes with an accuracy budget: --max-accuracy-drop, --min-sqnr-db or "
            "--min-psnr-db"
        )
    if args.precisions != "w8a8,w4a8" and not (budgets or accuracy):
        raise QCompilerError(
            "--precisions goes with a budget: --size-budget-kb, --latency-budget-ms, "
            "--max-accuracy-drop, --min-sqnr-db or --min-psnr-db"
        )
    if args.sensitivity != "measured" and not budgets:
        raise QCompilerError(
            "--sensitivity goes with a size or latency budget: --size-budget-kb or "
            "--latency-budget-ms (the accuracy budgets measure every candidate they choose)"
        )
    if len(accuracy) > 1:
        raise QCompilerError(f"{' and '.join(accuracy)} are budgets of their own: give one")
    if args.max_accuracy_drop is not None:
        art = _compile_within_accuracy_drop(args, board)
    elif accuracy:
        art = _compile_within_output_db(args, board)
    elif args.size_budget_kb is not None or args.latency_budget_ms is not None:
        art, confirm = _compile_within_budget(args, board)
    else:
        art = api.compile(
            args.model,
            calib=args.calib,
            target=board,
            config=_config(args) if args.calib else None,
            preprocess=_preprocess(args),
            limit=args.limit,
            tuning_records=args.tuning_records,
            cross_compiler=args.cross_compiler,
        )
    path = art.export(args.output)
    quantization = art.manifest["quantization"]
    wide = quantization.get("int16_activations", [])
    measured = quantization.get("activations_measured")
    why = (
        f", measured: output PSNR {measured['all_8_bit_db']:.1f} dB all at 8 bits, "
        f"{measured['chosen_db']:.1f} dB with these"
        + (
            " (no share was enough: every activation, the weights rounded against their inputs)"
            if measured.get("widened")
            else ""
        )
        if measured
        else ""
    )
    print(
        f"wrote {path} for {board.name} ({art.manifest['weight_bytes']} weight bytes, "
        f"{len(quantization['float_fallbacks'])} float fallback op(s), "
        f"{len(wide)} int16 activation(s){why})"
    )
    if confirm is not None:
        confirm(api.load(path))
    return 0


def _records(args, board) -> str:
    """The tuning database latencies are measured into: ``--tuning-records``, else one per
    board in the user's cache (kernels are keyed by their code, so models share it)."""
    return args.tuning_records or str(Path.home() / ".cache" / "qcompiler" / "records" / board.name)


def _precisions(args) -> tuple[str, ...]:
    return tuple(p.strip() for p in args.precisions.split(",") if p.strip())


def _search_options(args, board) -> dict:
    """What an accuracy or output budget search minimizes and the precisions it may choose;
    where it minimizes latency or prices ``w8a16``/``float`` layers, the tuning database and
    board the layers' latencies are measured with."""
    precisions = _precisions(args)
    options = {"precisions": precisions, "minimize": MINIMIZE[args.minimize]}
    if args.minimize == "size" and not set(precisions) - {"w8a8", "w4a8"}:
        return options
    return {
        **options,
        "records": _records(args, board),
        "rpc": _endpoint(args),
        "threads": args.threads,
    }


# --minimize: what an accuracy or output budget search minimizes, as the API names it
MINIMIZE = {"size": "bytes", "latency": "latency_ms"}


def _calibrated_with_probe(args):
    """The config, the calibrated model and the calibration samples for the weight probe: the
    first few, which the layers' statistics leave out (``api.PROBE_HOLDOUT``)."""
    config = _config(args)
    model, calibration = api.calibrate(
        args.model,
        args.calib,
        preprocess=_preprocess(args),
        limit=args.limit,
        layer_inputs=config.wants_layer_inputs(four_bit=True),
        equalize=config.equalize,
    )
    probe = api.calibration_samples(model, args.calib, _preprocess(args), limit=api.PROBE_HOLDOUT)
    return config, model, calibration, probe


def _print_candidates(tried, reference: float, held_out_reference: float | None) -> None:
    """Each candidate of an accuracy search, smallest first, with its top-1 and drop on the
    searched samples and, where some were held out, on those."""

    def scores(top1: float, held_out: float | None) -> str:
        text = f"top-1 {top1:.4f} ({100 * (top1 - reference):+.2f} points)"
        if held_out is None:
            return text
        return f"{text}, held out {held_out:.4f} ({100 * (held_out - held_out_reference):+.2f})"

    _print_tried(tried, lambda c: scores(c.top1, c.held_out_top1))


def _print_tried(tried, score) -> None:
    """Each candidate a budget search built, smallest first: its 4-bit layers, rounding, bytes
    and ``score(candidate)``."""
    for candidate in sorted(tried, key=lambda c: c.bytes):
        rounding = f", {candidate.rounding} rounding" if candidate.int4_weights else ""
        print(
            f"  tried {len(candidate.int4_weights)} W4A8 layers{rounding}{_wider_layers(candidate)}"
            f", {candidate.bytes} weight bytes{_predicted(candidate)}: {score(candidate)}"
        )


def _predicted(candidate) -> str:
    """A candidate's latency predicted on the board, where its layers were measured."""
    if candidate.latency_ms is None:
        return ""
    return f", {candidate.latency_ms:.3f} ms predicted"


def _wider_layers(chosen) -> str:
    """A candidate's ``w8a16`` and ``float`` layers, in words, where it has any."""
    counts = ((len(chosen.w8a16_layers), "W8A16"), (len(chosen.float_layers), "float"))
    return "".join(f", {n} {what}" for n, what in counts if n)


def _compile_within_accuracy_drop(args, board):
    """``--max-accuracy-drop``: the fewest weight bytes whose top-1 on ``--data`` stays within
    budget, each candidate built and scored (see
    :func:`qcompiler.api.choose_within_accuracy_drop`)."""
    if not args.calib or not args.data:
        raise QCompilerError("--max-accuracy-drop needs --calib and labelled --data to score on")
    if args.size_budget_kb is not None or args.latency_budget_ms is not None:
        raise QCompilerError("--max-accuracy-drop is a budget of its own: drop the other budgets")
    config, model, calibration, probe = _calibrated_with_probe(args)
    labelled = list(_labelled(args, model))
    try:
        search = api.choose_within_accuracy_drop(
            model,
            calibration,
            labelled,
            args.max_accuracy_drop,
            config,
            samples=probe,
            holdout=args.holdout,
            target=board,
            **_search_options(args, board),
        )
    except api.AccuracyBudgetError as err:  # what was measured, before the reason
        _print_candidates(err.tried, err.reference, err.held_out_reference)
        raise
    _print_candidates(search.tried, search.reference, search.held_out_reference)
    config, plan = search.config, search.plan
    held = ""
    if search.held_out:
        held = f", {search.held_out_reference:.4f} on the {search.held_out} held out"
    print(
        f"mixed precision: {len(config.int4_weights)} of {len(plan.precisions)} layers at W4A8 "
        f"({search.chosen.rounding} rounding){_wider_layers(search.chosen)}, {plan.bytes} "
        f"weight bytes{_predicted(search.chosen)}; float top-1 "
        f"{search.reference:.4f} on {search.searched} samples searched{held}"
    )
    return _build(args, board, model, calibration, config)


def _build(args, board, model, calibration, config):
    """The artifact of ``config`` chosen by a budget search, built for ``board`` (with the
    records its layers' latencies were measured into, where they were)."""
    quant = api.quantize(model, None, config, calibration=calibration)
    records = _search_options(args, board).get("records", args.tuning_records)
    return quant.build(board, tuning_records=records, cross_compiler=args.cross_compiler)


def _compile_within_output_db(args, board):
    """``--min-sqnr-db`` / ``--min-psnr-db``: the fewest weight bytes whose build keeps the
    output SQNR (PSNR) against the float model, measured on ``--data`` (else on 8 calibration
    samples), at the budget or above; each candidate built and measured (see
    :func:`qcompiler.api.choose_within_output_db`)."""
    measure = "sqnr" if args.min_sqnr_db is not None else "psnr"
    flag = f"--min-{measure}-db"
    if not args.calib:
        raise QCompilerError(f"{flag} needs --calib (the layers' statistics)")
    if args.size_budget_kb is not None or args.latency_budget_ms is not None:
        raise QCompilerError(f"{flag} is a budget of its own: drop the other budgets")
    config, model, calibration, probe = _calibrated_with_probe(args)
    measure_on = _inputs(args, model) if args.data else probe
    search = api.choose_within_output_db(
        model,
        calibration,
        getattr(args, f"min_{measure}_db"),
        config,
        samples=probe,
        measure=measure,
        measure_on=measure_on,
        target=board,
        **_search_options(args, board),
    )
    name = measure.upper()
    _print_tried(search.tried, lambda c: f"output {name} {c.db:.2f} dB")
    config, plan, chosen = search.config, search.plan, search.chosen
    where = "--data" if args.data else "calibration"
    print(
        f"mixed precision: {len(config.int4_weights)} of {len(plan.precisions)} layers at W4A8 "
        f"({chosen.rounding} rounding){_wider_layers(chosen)}, {plan.bytes} weight bytes"
        f"{_predicted(chosen)}; output {name} "
        f"{chosen.db:.2f} dB against the float model on {search.measured_on} {where} samples"
    )
    return _build(args, board, model, calibration, config)


def _compile_within_budget(args, board):
    """``--size-budget-kb`` / ``--latency-budget-ms``: 4-bit weights for the layers whose
    rounding, measured on the model's outputs for a few calibration samples, costs least,
    while the weights fit and the model's latency -- each layer's kernels measured on the board
    at 8 and at 4 bits -- stays within budget (see
    :func:`qcompiler.api.choose_weight_precisions`)."""
    if not args.calib:
        raise QCompilerError("a size or latency budget needs --calib (the layers' statistics)")
    precisions = _precisions(args)
    wider = set(precisions) - {"w8a8", "w4a8"}
    latency = {}
    if args.latency_budget_ms is not None or wider:
        latency = {
            "max_latency_ms": args.latency_budget_ms,
            "records": _records(args, board),
            "rpc": _endpoint(args),
            "threads": args.threads,
        }
    config, model, calibration, probe = _calibrated_with_probe(args)
    size = None if args.size_budget_kb is None else args.size_budget_kb * 1024
    config, plan = api.choose_weight_precisions(
        calibration,
        config,
        max_bytes=size,
        samples=probe,
        target=board,
        precisions=precisions,
        sensitivity=args.sensitivity,
        **latency,
    )
    counts = Counter(plan.precisions.values())
    listed = ", ".join(f"{counts[p]} at {p.upper()}" for p in precisions if counts[p])
    measured = f", {plan.latency_ms:.3f} ms predicted on the board" if latency else ""
    how = "the build" if wider else "activations exact"
    print(
        f"mixed precision: {len(plan.precisions)} layers, {listed}; {plan.bytes} weight bytes"
        f"{measured}; output SQNR on {len(probe)} calibration samples ({how}): "
        f"{plan.measured_sqnr_db:.1f} dB"
    )
    quant = api.quantize(model, None, config, calibration=calibration)
    # Built with the records the layers were measured in, so it runs the kernels predicted.
    records = latency["records"] if latency else args.tuning_records
    art = quant.build(board, tuning_records=records, cross_compiler=args.cross_compiler)
    if args.latency_budget_ms is None:
        return art, None

    def confirm(exported) -> None:
        """The plan predicted from its kernels, measured end to end on the board."""
        seconds = api.board_latency(
            exported, probe[0], board, rpc=latency["rpc"], threads=args.threads
        )
        ms = 1e3 * float(np.median(seconds))
        print(
            f"measured on {board.name} over RPC: {ms:.3f} ms end to end (median of "
            f"{len(seconds)}; predicted {plan.latency_ms:.3f}, budget {args.latency_budget_ms:g})"
        )
        if ms > args.latency_budget_ms:
            print(
                f"warning: the build runs over the latency budget, {ms:.3f} against "
                f"{args.latency_budget_ms:g} ms (the prediction sums the kernels; the VM's work "
                "between them is not in it): a tighter budget leaves room for it",
                file=sys.stderr,
            )

    return art, confirm


def cmd_report(args) -> int:
    from qcompiler import report

    if not args.calib:
        raise QCompilerError("qc report needs --calib (the layers are measured on it)")
    board = _board(args)
    config, model, calibration, probe = _calibrated_with_probe(args)
    measured = report.mixed_precision_report(
        model,
        calibration,
        config,
        samples=probe,
        records=_records(args, board),
        target=board,
        rpc=_endpoint(args),
        threads=args.threads,
        labelled=list(_labelled(args, model)) if args.data else None,
        max_bytes=None if args.size_budget_kb is None else args.size_budget_kb * 1024,
        max_latency_ms=args.latency_budget_ms,
    )
    for path in report.write(measured, args.output):
        print(f"wrote {path}")
    return 0


def cmd_targets(args) -> int:
    for board in boards(args.boards).values():
        info = board.summary()
        print(f"{board.name:<18}{board.description}")
        print(f"{'':<18}TVM target: {json.dumps(target_json(board.tvm_target, derived=False))}")
        extra = f"cross compiler: {board.cross_compiler}" if board.cross_compiler else "native"
        print(f"{'':<18}{extra}; RPC key: {info['rpc_key']!r}; threads: {board.threads or 'all'}")
        for note in board.notes:
            print(f"{'':<18}note: {note}")
        if board.source != "built in":
            print(f"{'':<18}from {board.source}")
    print("(TVM target tags such as 'raspberry-pi/4b-aarch64' are accepted as --target too)")
    return 0


def _endpoint(args):
    if not args.rpc_tracker:
        if args.rpc_key:
            raise QCompilerError("--rpc-key needs --rpc-tracker HOST:PORT")
        return None
    host, _, port = args.rpc_tracker.rpartition(":")
    if not host or not port.isdigit():
        raise QCompilerError(f"--rpc-tracker must be HOST:PORT, got {args.rpc_tracker!r}")
    if not args.rpc_key:
        raise QCompilerError("--rpc-tracker needs --rpc-key (the key the board registered)")
    return RPCEndpoint(host, int(port), args.rpc_key, timeout_s=args.rpc_timeout)


def cmd_tune(args) -> int:
    endpoint = _endpoint(args)
    if args.float:
        model = args.model
    else:
        model = api.quantize(
            args.model,
            args.calib,
            _config(args) if args.calib else None,
            preprocess=_preprocess(args),
            limit=args.limit,
        )
    api.tune(model, args.output, _board(args), args.trials, rpc=endpoint, threads=args.threads)
    print(
        f"records in {args.output}; use them with `qc compile ... --tuning-records {args.output}`"
    )
    return 0


def _output_specs(manifest: dict) -> list:
    return [api.InputSpec(o["name"], tuple(o["shape"]), o["dtype"]) for o in manifest["outputs"]]


def _random_inputs(manifest: dict) -> list[dict]:
    """One sample of random inputs in each input's dtype (for a latency check without data)."""
    rng = np.random.default_rng(0)
    sample = {}
    for spec in manifest["inputs"]:
        dtype = np.dtype(spec["dtype"])
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            value = rng.integers(info.min, info.max, size=spec["shape"], endpoint=True)
        else:
            value = rng.standard_normal(spec["shape"])
        sample[spec["name"]] = value.astype(dtype)
    return [sample]


def cmd_run(args) -> int:
    art = api.load(args.artifact)
    endpoint = _endpoint(args)
    specs = [
        api.InputSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in art.manifest["inputs"]
    ]
    samples = load_calibration(args.inputs, specs) if args.inputs else _random_inputs(art.manifest)
    samples, done = list(samples), []
    partial = Path(f"{args.output}.partial.npz") if args.output else None
    if args.resume:
        if partial is None or not partial.is_file():
            raise QCompilerError(f"--resume: there is no {partial or '<--output>.partial.npz'}")
        done = list(load_calibration(partial, _output_specs(art.manifest)))
        if len(done) >= len(samples):
            raise QCompilerError(
                f"--resume: {partial} holds {len(done)} outputs, the inputs only "
                f"{len(samples)} samples; are these the same inputs?"
            )
        print(f"resuming after the {len(done)} sample(s) in {partial}")
    try:
        outputs, times = api.run(
            art, samples[len(done) :], rpc=endpoint, threads=args.threads, repeat=args.repeat
        )
    except api.RunInterrupted as err:
        if partial is None:
            raise
        save_npz_stream(partial, done + err.outputs)
        raise QCompilerError(
            f"{err}; the outputs of the first {len(done) + len(err.outputs)} sample(s) are "
            f"kept in {partial}: run the same command with --resume to finish"
        ) from None
    outputs = done + outputs
    where = f"on {endpoint}" if endpoint else "here"
    if args.output:
        save_npz_stream(args.output, outputs)
        if partial.exists():
            partial.unlink()
        print(f"wrote {args.output} ({len(outputs)} sample(s))")
    else:
        for name, value in outputs[-1].items():
            print(f"{name}: shape {value.shape}, first values {value.reshape(-1)[:8]}")
    ms = np.array(times) * 1e3
    print(
        f"latency {where}, {len(ms)} run(s): median {np.median(ms):.3f} ms, "
        f"min {ms.min():.3f} ms, max {ms.max():.3f} ms"
    )
    return 0


def _images(args, model) -> list[dict]:
    """Unlabelled inputs: every image of the ``--data`` folder (after ``--offset``)."""
    from qcompiler.data import image_sample

    files = sorted(
        p
        for p in Path(args.data).iterdir()
        if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp")
    )
    files = files[args.offset : args.offset + args.count if args.count else None]
    if not files:
        raise QCompilerError(f"no images in {args.data} (after --offset {args.offset})")
    spec = model.inputs[0]
    return [{spec.name: image_sample(f, spec, _preprocess(args))} for f in files]


def _inputs(args, model) -> list[dict]:
    """The ``--data`` inputs, labelled (an .npz) or not (an image folder); labels ignored."""
    if args.data.endswith(".npz"):
        return [inputs for inputs, _ in _labelled(args, model)]
    return _images(args, model)


def _labelled(args, model):
    """(inputs, label) pairs from an image folder (ImageNet naming) or an npz with labels."""
    spec = model.inputs[0]
    if args.data.endswith(".npz"):
        with np.load(args.data) as data:
            images, labels = data["images"], data["labels"]
        window = slice(args.offset, args.offset + args.count if args.count else None)
        pre = _preprocess(args)
        for image, label in zip(images[window], labels[window]):
            x = image.astype(np.float32)
            if pre is not None:
                x = (
                    x - np.asarray(pre.mean, np.float32)[: x.shape[-1] if x.ndim == 3 else 1]
                ) / np.asarray(pre.std, np.float32)[: x.shape[-1] if x.ndim == 3 else 1]
            yield {spec.name: x.reshape(spec.shape)}, int(label)
        return
    pairs = labelled_images(args.data, args.labels)
    pairs = pairs[args.offset : args.offset + args.count if args.count else None]
    from qcompiler.data import image_sample

    for path, label in pairs:
        yield {spec.name: image_sample(path, spec, _preprocess(args))}, label + args.label_offset


def cmd_eval(args) -> int:
    if args.metric not in api.AGREEMENT_METRICS:
        raise QCompilerError(
            f"unknown metric {args.metric!r}, candidates are {list(api.AGREEMENT_METRICS)}"
        )
    model = api.load_model(args.model)
    if api.is_prequantized(model.mod):
        # The baseline is the same quantized model run in float (TVM's dequantize/op/quantize).
        quant = api.quantize_prequantized(model)
    else:
        if not args.calib:
            raise QCompilerError(f"{args.model} is a float model: eval needs --calib DATA")
        config = _config(args)
        model, calibration = api.calibrate(
            model,
            args.calib,
            preprocess=_preprocess(args),
            limit=args.limit,
            layer_inputs=config.wants_layer_inputs(),
            equalize=config.equalize,
        )
        quant = api.quantize(model, None, config, calibration=calibration)
    float_art = api.compile_float(model, args.target)
    int_art = quant.build(args.target)
    if args.metric != "top1":
        # No labels: the float model's answers are the ground truth.
        samples = _images(args, model)
        score = api.agreement(float_art, int_art, samples, args.metric)
        print(f"{model.name}: {args.metric} of the quantized model against the float model's "
              f"answers on {len(samples)} image(s): {score:.4f}")  # fmt: skip
        return 0
    # Each pass streams the images again: memory does not grow with their number.
    fp32, int8 = (api.top1_hits(art, _labelled(args, model)) for art in (float_art, int_art))
    if quant.config is None:
        print("(already quantized: 'fp32' is the same model run in float by TVM's QDQ import)")
    print(f"{'model':<28}{'fp32 top1':>10}{'int8 top1':>10}{'delta':>8}")
    print(f"{model.name:<28}{fp32.mean():>10.4f}{int8.mean():>10.4f}"
          f"{(int8.mean() - fp32.mean()) * 100:>+8.2f}")  # fmt: skip
    print(f"delta {paired_difference(fp32, int8).describe('fp32', 'int8')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qc", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def quant_options(p):
        p.add_argument("model", help="model: .onnx or .tflite (float, or already quantized)")
        p.add_argument(
            "--calib",
            help=".npz/.npy (one array per input, sample axis first) or image folder; "
            "needed for float models, not for already-quantized ones",
        )
        p.add_argument(
            "--preprocess",
            help="for image folders, e.g. "
            "'resize=256,size=224x224,mean=127,std=128,layout=NCHW,channels=RGB'",
        )
        p.add_argument("--limit", type=int, help="use at most this many calibration samples")
        p.add_argument("--scheme", default="hybrid", choices=sorted(PRESETS))
        p.add_argument(
            "--calib-method",
            default="minmax",
            choices=[*CALIBRATION_METHODS, AUTO_METHOD],
            help="activation range method; 'auto': per tensor, measured on the outputs",
        )
        p.add_argument("--percentile", type=float, default=99.99)
        p.add_argument(
            "--int16",
            help="16-bit activations: 'auto' (default: those whose 8-bit rounding alone costs "
            "the outputs most, measured on two calibration samples, when the outputs need it), "
            "'none', a share of the tensors whose 8-bit quantization is noisiest by the "
            "calibration histograms (e.g. 0.05), or tensor names (lv12,lv40)",
        )
        p.add_argument(
            "--int4",
            help="4-bit weights (W4A8, stored two per byte) for these conv/matmul layers, "
            "named as in the artifact's layer table (lv12,lv40)",
        )
        p.add_argument(
            "--weight-rounding",
            default="auto",
            choices=WEIGHT_ROUNDINGS,
            help="optimized: round each weight to reduce its layer's output error on the "
            "calibration data (GPTQ + coordinate descent); optimized-4bit: only the 4-bit "
            "layers'; auto (default): optimized where the weights are the larger error: the "
            "4-bit layers, or every layer when the measured int16 choice widens every activation",
        )
        p.add_argument(
            "--bias-correction",
            action="store_true",
            help="remove the mean output shift weight rounding causes, per channel, in every "
            "layer (optimized 4-bit layers always have theirs removed)",
        )
        p.add_argument(
            "--equalize",
            action="store_true",
            help="cross-layer equalization: rescale conv pairs joined by a bias add and a ReLU "
            "so that each channel's weight ranges match, before calibrating",
        )
        p.add_argument("--target", default="x86", help="board (see `qc targets`) or TVM target tag")
        p.add_argument("--boards", help="TOML file of extra board profiles")

    def measure_options(p):
        """Where kernels are measured: a board behind a tracker, or a local server."""
        p.add_argument("--rpc-tracker", help="HOST:PORT of a tracker (default: a local one)")
        p.add_argument("--rpc-key", help="key the board's RPC server registered under")
        p.add_argument(
            "--rpc-timeout", type=int, default=60, help="seconds a board may take per measurement"
        )
        p.add_argument("--threads", type=int, help="threads of the local server (default: all)")

    def labelled_options(p, required: bool):
        p.add_argument(
            "--data",
            required=required,
            help="labelled images folder, or .npz with 'images' and 'labels' (map50/miou: "
            "any images folder)",
        )
        p.add_argument("--labels", help="synset list for an image folder (class = line number)")
        p.add_argument(
            "--label-offset",
            type=int,
            default=0,
            help="added to folder labels (1 for 1001-class models)",
        )
        p.add_argument("--offset", type=int, default=0, help="skip this many evaluation samples")
        p.add_argument("--count", type=int, help="evaluate at most this many samples")

    p = sub.add_parser("compile", help="quantize and build a model into an artifact directory")
    quant_options(p)
    p.add_argument("-o", "--output", required=True, help="artifact directory to write")
    p.add_argument(
        "--size-budget-kb",
        type=float,
        help="mixed precision: give 4-bit weights to the layers whose rounding adds the least "
        "noise to the outputs (measured on 8 calibration samples) until the weights fit this "
        "many KiB",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="POINTS",
        help="mixed precision: the smallest weights whose top-1 on --data stays within this "
        "many points of the float model's, each candidate built and scored; the search ranks "
        "on every other sample of --data and confirms its choice on the rest",
    )
    p.add_argument(
        "--min-sqnr-db",
        type=float,
        metavar="DB",
        help="mixed precision without labels: the smallest weights whose build keeps the output "
        "SQNR against the float model at DB or more, measured on --data (images or .npz; "
        "else 8 calibration samples), each candidate built and measured",
    )
    p.add_argument(
        "--min-psnr-db",
        type=float,
        metavar="DB",
        help="as --min-sqnr-db with the output PSNR (each output column's error against its "
        "peak, on the scale of the 16-bit activation choice's PSNR; a detector's near-empty "
        "score columns make its SQNR low)",
    )
    p.add_argument(
        "--no-holdout",
        dest="holdout",
        action="store_false",
        help="with --max-accuracy-drop: search on all of --data, holding none out to confirm",
    )
    labelled_options(p, required=False)
    p.add_argument(
        "--latency-budget-ms",
        type=float,
        help="mixed precision: 4-bit weights only where the model's latency on the board stays "
        "within this many ms; each layer's kernels are measured there at 8 and 4 bits (into "
        "--tuning-records, or ~/.cache/qcompiler/records/BOARD) through --rpc-tracker/--rpc-key, "
        "or on this host",
    )
    p.add_argument(
        "--precisions",
        default="w8a8,w4a8",
        help="with a budget: the precisions a layer may get, among w8a8,w4a8,w8a16 (its input "
        "at 16 bits),float (its weights float); w8a16 and float are priced by the noise they "
        "remove and their kernels' time on the board, and let an accuracy or SQNR budget "
        "that all-8-bit misses be met",
    )
    p.add_argument(
        "--sensitivity",
        choices=list(api.SENSITIVITIES),
        default="measured",
        help="with --size-budget-kb/--latency-budget-ms: each layer's 4-bit error as measured "
        "on the outputs with it alone at 4 bits (default), or predicted by HAWQ's second-order "
        "proxy (the trace of the loss's Hessian over the layer's weights, by Hutchinson's "
        "estimate on the float model, times the squared norm of the rounding error)",
    )
    p.add_argument(
        "--minimize",
        choices=list(MINIMIZE),
        default="size",
        help="with --max-accuracy-drop/--min-sqnr-db/--min-psnr-db: what the chosen build "
        "minimizes within the budget: its weight bytes (default) or its latency on the board, "
        "predicted from each layer's kernels measured there at each precision",
    )
    measure_options(p)
    p.add_argument("--tuning-records", help="directory written by `qc tune`")
    p.add_argument(
        "--cross-compiler",
        help="C++ compiler that links the library for the board (default: the board's, "
        "e.g. aarch64-linux-gnu-g++)",
    )
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "report",
        help="per-layer sensitivity and board latency at W8A8/W4A8, and a Pareto plot",
    )
    quant_options(p)
    p.add_argument("-o", "--output", required=True, help="folder for report.md and pareto.png")
    labelled_options(p, required=False)
    p.add_argument("--size-budget-kb", type=float, help="mark the choice within this size")
    p.add_argument("--latency-budget-ms", type=float, help="mark the choice within this latency")
    p.add_argument("--tuning-records", help="tuning database (default ~/.cache/qcompiler/...)")
    measure_options(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("tune", help="tune the kernels of the quantized model over RPC")
    quant_options(p)
    p.add_argument("-o", "--output", required=True, help="tuning records directory (reused)")
    p.add_argument("--trials", type=int, default=64, help="search trials for the whole model")
    measure_options(p)
    p.add_argument("--float", action="store_true", help="tune the float model instead")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("run", help="run an artifact here or on a board over RPC")
    p.add_argument("artifact")
    p.add_argument("--inputs", help=".npz keyed by input name, sample axis first (default: random)")
    p.add_argument("--output", help=".npz to write the outputs to, stacked over samples")
    p.add_argument("--threads", type=int, help="threads to run on (default: one per core)")
    p.add_argument("--rpc-tracker", help="HOST:PORT of the tracker the board registered with")
    p.add_argument("--rpc-key", help="key the board's RPC server registered under")
    p.add_argument("--rpc-timeout", type=int, default=60, help="seconds a board may take per step")
    p.add_argument("--repeat", type=int, default=20, help="timed runs (of the last sample)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a run a board fault interrupted, after the outputs it kept",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("targets", help="list the boards and their TVM targets")
    p.add_argument("--boards", help="TOML file of extra board profiles")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("eval", help="fp32 vs quantized accuracy side by side")
    quant_options(p)
    labelled_options(p, required=True)
    p.add_argument(
        "--metric",
        default="top1",
        choices=api.AGREEMENT_METRICS,
        help="top1 (labels), or against the float model's answers: map50 (YOLOX "
        "detections, mAP@0.5), miou (masks >= 0.5, mean of the images' IoUs), pooled_iou "
        "(their IoU pooled over the images)",
    )
    p.set_defaults(func=cmd_eval)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            return args.func(args)
    except QCompilerError as err:
        print(f"qc: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
