"""Already-quantized models: qcompiler's integer build against LiteRT, agreement and latency.

For each TFLite integer model in ../shared (no calibration: the model's own parameters), on real
images, in one process:

- agreement of the final output with LiteRT's reference kernels (``BUILTIN_REF``, the
  bit-exact target), its optimized builtin kernels and its default (XNNPACK) delegate: the share
  of exactly equal elements and the largest difference in steps (LSB);
- top-1 agreement with the reference kernels (argmax of the output);
- latency (median of ``--runs``, 1 thread) of qcompiler's untuned build and of LiteRT with its
  default XNNPACK delegate and with its optimized builtin kernels.

and for ONNX QDQ models made here by onnxruntime's ``quantize_static`` (per-channel int8
weights, uint8 activations, calibrated on 16 ImageNet samples), the same against onnxruntime
(its x86 integer kernels are the reference there), with onnxruntime's latency beside ours.

Run from the repository root::

    python bench/prequantized.py                       # resnet8, mobilenet_v2, vww + ONNX QDQ
    python bench/prequantized.py --models deeplabv3 --images 1 --onnx ""
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402  (preamble, peak RSS)
from speed import time_call  # noqa: E402

import qcompiler  # noqa: E402
from qcompiler.deploy.artifact import set_threads  # noqa: E402
from qcompiler.evaluate import label_miou  # noqa: E402

MODELS = {
    "resnet8": ("resnet8_cifar10/pretrainedResnet_quant.tflite", "cifar"),
    "mobilenet_v2": ("mobilenet_v2_quant/mobilenet_v2_1.0_224_quant.tflite", "imagenet"),
    "vww": ("vww_mobilenet/vww_96_int8.tflite", "imagenet"),
    "deeplabv3": ("deeplabv3_quant/deeplabv3_mnv2_pascal_quant.tflite", "bird"),
}
KERNELS = {  # LiteRT op resolver -> column label
    "BUILTIN_REF": "LiteRT reference",
    "BUILTIN_WITHOUT_DEFAULT_DELEGATES": "LiteRT builtin",
    "AUTO": "LiteRT XNNPACK",
}


def inputs_for(shared: Path, source: str, shape, dtype: str, count: int) -> list[np.ndarray]:
    from PIL import Image

    size = (int(shape[2]), int(shape[1]))
    if source == "cifar":
        images = np.load(shared / "data" / "cifar10_test_half.npz")["images"][:count]
    elif source == "bird":
        bird = shared / "models" / "deeplabv3_quant" / "bird_segmentation.bmp"
        images = [np.asarray(Image.open(bird).convert("RGB").resize(size))]
    else:
        files = sorted(glob.glob(str(shared / "data" / "imagenet_samples" / "*.jpg")))[:count]
        images = [np.asarray(Image.open(f).convert("RGB").resize(size)) for f in files]
    out = []
    for image in images:
        image = np.asarray(image, dtype=np.uint8)
        x = (image.astype(np.int16) - 128).astype(np.int8) if dtype == "int8" else image
        out.append(x[None])
    return out


def interpreter(path: Path, kind: str):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(
        model_path=str(path),
        num_threads=1,
        experimental_op_resolver_type=getattr(OpResolverType, kind),
    )
    it.allocate_tensors()
    return it


def litert_call(it, x):
    index = it.get_input_details()[0]["index"]
    out = it.get_output_details()[0]["index"]

    def call():
        it.set_tensor(index, x)
        it.invoke()
        return it.get_tensor(out)

    return call


def median_ms(call, runs: int) -> float:
    return 1e3 * time_call(call, runs, warmup=3)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet8,mobilenet_v2,vww")
    parser.add_argument("--images", type=int, default=50, help="images compared per model")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument(
        "--onnx", default="efficientnet_lite0", help="float ONNX models to quantize as QDQ"
    )
    args = parser.parse_args(argv)
    shared = Path(os.environ.get("QC_SHARED", accuracy.REPO.parent / "shared")).resolve()
    print("\n".join(accuracy.preamble(shared)[:5]))
    set_threads(1)
    for name in filter(None, args.models.split(",")):
        relative, source = MODELS[name]
        path = shared / "models" / relative
        start = time.perf_counter()
        artifact = qcompiler.compile(str(path), target="x86")
        build_s = time.perf_counter() - start
        spec = artifact.manifest["inputs"][0]
        inputs = inputs_for(shared, source, spec["shape"], spec["dtype"], args.images)
        ours = [next(iter(artifact.run({spec["name"]: x}).values())) for x in inputs]
        print(f"\n### {name} ({relative}, {len(inputs)} input(s), build {build_s:.1f} s)\n")
        agreement = "same top-1" if ours[0].ndim <= 2 else "mIoU"
        print(f"| vs | equal elements | max diff (LSB) | {agreement} | LiteRT ms | qcompiler ms |")
        print("|---|---|---|---|---|---|")
        feed = {spec["name"]: inputs[0]}
        ours_ms = median_ms(lambda art=artifact, feed=feed: art.run(feed), args.runs)
        for kind, label in KERNELS.items():
            it = interpreter(path, kind)
            ref = [litert_call(it, x)().copy() for x in inputs]
            diff = np.abs(np.stack(ours).astype(np.int64) - np.stack(ref).astype(np.int64))
            if ours[0].ndim <= 2:  # class scores: the same top-1
                top1 = np.mean([np.argmax(o) == np.argmax(r) for o, r in zip(ours, ref)])
            else:  # a label map (DeepLab's argmax): mIoU against the reference's labels
                top1 = np.mean([label_miou(r, o) for o, r in zip(ours, ref)])
            theirs_ms = median_ms(litert_call(it, inputs[0]), args.runs)
            digits = 0 if ours[0].ndim <= 2 else 3
            print(
                f"| {label} | {100 * (diff == 0).mean():.3f}% | {diff.max()} | "
                f"{100 * top1:.{digits}f}% | {theirs_ms:.3f} | {ours_ms:.3f} |"
            )
        fallbacks = artifact.manifest["quantization"]["float_fallbacks"]
        print(
            f"\nfloat fallbacks: {fallbacks or 'none'}; peak RSS {accuracy._peak_rss_mib():.0f} MiB"
        )
    for name in filter(None, args.onnx.split(",")):
        onnx_qdq(shared, name, args)
    return 0


def onnx_qdq(shared: Path, name: str, args) -> None:
    """An ONNX QDQ model made by onnxruntime from ``name``'s float model, against onnxruntime."""
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnxruntime import quantization

    source = shared / "models" / name / f"{name}_fp32.onnx"
    spec = qcompiler.api.load_model(str(source)).inputs[0]
    images = inputs_for(shared, "imagenet", [1, *spec.shape[2:], 3], "uint8", 16 + args.images)
    floats = [((x[0].astype(np.float32) - 127) / 128).transpose(2, 0, 1)[None] for x in images]

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.samples = iter({spec.name: x} for x in floats[:16])

        def get_next(self):
            return next(self.samples, None)

    with tempfile.TemporaryDirectory() as tmp:
        qdq = Path(tmp) / f"{name}.qdq.onnx"
        quantization.quantize_static(
            str(source),
            str(qdq),
            Reader(),
            quant_format=quantization.QuantFormat.QDQ,
            per_channel=True,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
        )
        start = time.perf_counter()
        artifact = qcompiler.compile(str(qdq), target="x86")
        build_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(qdq), options, providers=["CPUExecutionProvider"])
        model = onnx.load(qdq)
    last = next(n for n in model.graph.node if n.output[0] == model.graph.output[0].name)
    step = next(
        onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == last.input[1]
    )
    evaluated = floats[16:]
    ours = [next(iter(artifact.run({spec.name: x}).values())) for x in evaluated]
    ref = [session.run(None, {spec.name: x})[0] for x in evaluated]
    steps = np.rint(np.abs(np.stack(ours) - np.stack(ref)) / step)
    top1 = np.mean([np.argmax(o) == np.argmax(r) for o, r in zip(ours, ref)])
    feed = {spec.name: evaluated[0]}
    ours_ms = median_ms(lambda: artifact.run(feed), args.runs)
    theirs_ms = median_ms(lambda: session.run(None, feed), args.runs)
    print(
        f"\n### {name} ONNX QDQ by quantize_static ({len(evaluated)} images, build {build_s:.1f} s)"
    )
    print("\n| vs | equal elements | max diff (LSB) | same top-1 | onnxruntime ms | qcompiler ms |")
    print("|---|---|---|---|---|---|")
    print(
        f"| onnxruntime (CPU, 1 thread) | {100 * (steps == 0).mean():.3f}% | {steps.max():.0f} | "
        f"{100 * top1:.0f}% | {theirs_ms:.3f} | {ours_ms:.3f} |"
    )
    fallbacks = artifact.manifest["quantization"]["float_fallbacks"]
    print(f"\nfloat fallbacks: {fallbacks or 'none'}; peak RSS {accuracy._peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    sys.exit(main())
