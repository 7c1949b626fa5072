"""Task metrics (qcompiler.evaluate) against cases worked out by hand."""

import numpy as np
import pytest

from qcompiler.evaluate import (
    Detections,
    average_precision,
    box_iou,
    decode_yolox,
    label_miou,
    map50,
    mask_iou,
    nms,
    paired_difference,
    pooled_mask_iou,
)


def dets(boxes, scores, classes):
    return Detections(np.array(boxes, float).reshape(-1, 4), np.array(scores, float),
                      np.array(classes, int))  # fmt: skip


def test_box_iou_by_hand():
    got = box_iou([[0, 0, 2, 2]], [[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6], [0, 0, 1, 2]])
    np.testing.assert_allclose(got, [[1 / 7, 1.0, 0.0, 0.5]])


def test_nms_suppresses_within_a_class_only():
    found = dets(
        [[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [20, 20, 30, 30]],
        [0.6, 0.9, 0.8, 0.5],
        [0, 0, 1, 0],
    )
    kept = nms(found, 0.45)
    # box 0 overlaps box 1 (IoU 9/11) in class 0: suppressed; box 2 is another class.
    np.testing.assert_array_equal(kept.scores, [0.9, 0.8, 0.5])
    np.testing.assert_array_equal(kept.classes, [0, 1, 0])


def test_average_precision_by_hand():
    # Two objects; predictions TP (0.9), FP (0.8), TP (0.7): recall .5 .5 1, precision 1 .5 2/3.
    ap = average_precision(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3]))
    assert ap == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)


def test_map50_by_hand():
    truth = [dets([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [1, 1, 1], [0, 0, 1])]
    predicted = [
        dets(
            [[0, 0, 10, 11], [40, 40, 45, 45], [21, 21, 30, 30], [0, 0, 10, 10]],
            [0.9, 0.8, 0.7, 0.6],
            [0, 0, 0, 1],  # the last is the right box with the wrong class
        )
    ]
    # class 0: TP, FP, TP (IoU 81/100) -> AP 0.8333; class 1: no hit -> 0.
    assert map50(truth, predicted) == pytest.approx((0.5 + 0.5 * 2 / 3 + 0.0) / 2)
    assert map50(truth, truth) == 1.0


def test_a_duplicate_detection_is_a_false_positive():
    truth = [dets([[0, 0, 10, 10]], [1], [3])]
    predicted = [dets([[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [3, 3])]
    assert map50(truth, predicted) == 1.0  # the duplicate ranks below the full recall
    predicted = [dets([[0, 0, 10, 10], [0, 0, 10, 10]], [0.8, 0.9], [3, 3])]
    assert map50(truth, predicted) == 1.0


def test_decode_yolox_by_hand():
    # 64x64 input: 8x8 + 4x4 + 2x2 anchors. Anchor at stride 16, cell (x=1, y=2): 64 + 2*4 + 1.
    out = np.zeros((1, 84, 5 + 4), np.float32)
    out[0, :, 2:4] = -10.0  # tiny boxes elsewhere, scores 0
    out[0, 73, :4] = [0.5, 0.25, np.log(2.0), np.log(2.0)]
    out[0, 73, 4] = 0.9
    out[0, 73, 5:] = [0.1, 0.2, 0.3, 0.5]
    found = decode_yolox(out, (64, 64), score_threshold=0.01)
    assert len(found) == 1
    np.testing.assert_allclose(found.boxes[0], [24 - 16, 36 - 16, 24 + 16, 36 + 16], atol=1e-5)
    assert found.scores[0] == pytest.approx(0.45)
    assert found.classes[0] == 3
    with pytest.raises(ValueError, match="84 anchors"):
        decode_yolox(out, (416, 416))


def test_paired_difference_by_hand():
    reference = [1, 1, 1, 0, 0, 1, 1, 1]
    candidate = [1, 0, 1, 1, 0, 1, 0, 1]  # loses samples 1 and 6, gains sample 3
    found = paired_difference(reference, candidate)
    # d = [0, -1, 0, 1, 0, 0, -1, 0]: mean -1/8, sample variance 2.875 / 7
    assert (found.only_reference, found.only_candidate, found.samples) == (2, 1, 8)
    assert found.delta == pytest.approx(-0.125)
    assert found.margin == pytest.approx(1.96 * np.sqrt(2.875 / 7 / 8))
    assert found.describe("fp32", "int8") == (
        "-12.50 ± 44.41 points (95%) over 8 samples: 2 right only in fp32, 1 only in int8"
    )
    same = paired_difference(reference, reference)
    assert (same.delta, same.margin) == (0.0, 0.0)  # identical answers: no uncertainty
    rng = np.random.default_rng(0)
    a, b = rng.random(400) < 0.87, rng.random(400) < 0.86
    d = b.astype(float) - a
    found = paired_difference(a, b)
    assert found.delta == pytest.approx(d.mean())
    assert found.margin == pytest.approx(1.96 * d.std(ddof=1) / np.sqrt(400))
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1, 0], [1])


def test_mask_iou_by_hand():
    a = np.array([[0.9, 0.8], [0.1, 0.6]])
    b = np.array([[0.7, 0.2], [0.5, 0.4]])
    assert mask_iou(a, b) == pytest.approx(1 / 4)  # a: 3 pixels, b: 2; both: 1, union 4
    assert mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_pooled_mask_iou_by_hand():
    a = np.array([[0.9, 0.8], [0.1, 0.6]])
    b = np.array([[0.7, 0.2], [0.5, 0.4]])
    empty, speck = np.zeros((2, 2)), np.array([[0.0, 0.0], [0.0, 0.9]])
    # image 1: intersection 1, union 4; image 2: intersection 0, union 1
    assert pooled_mask_iou([a, empty], [b, speck]) == pytest.approx(1 / 5)
    assert np.mean([mask_iou(a, b), mask_iou(empty, speck)]) == pytest.approx(1 / 8)
    assert pooled_mask_iou([empty], [empty]) == 1.0
    with pytest.raises(ValueError):
        pooled_mask_iou([a, a], [b])


def test_label_miou_by_hand():
    truth = np.array([[0, 0, 1], [1, 2, 2]])
    predicted = np.array([[0, 1, 1], [1, 2, 0]])
    # class 0: both {(0,0)}, union {(0,0),(0,1),(1,2)} -> 1/3; class 1: 2/3; class 2: 1/2
    assert label_miou(truth, predicted) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert label_miou(truth, truth) == 1.0


def test_agreement_scores_masks_per_image_and_pooled():
    """``qc eval --metric miou / pooled_iou`` on a conv + sigmoid "segmenter": the quantized
    build against the float one, checked by plain numpy on the two builds' own masks."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qcompiler import api

    rng = np.random.default_rng(2)
    w = rng.normal(size=(1, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["c"], ["y"]),
        ],
        "segmenter",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 16, 16])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    samples = [{"x": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)} for _ in range(6)]
    imported = api.load_model(model)
    reference = api.compile_float(imported)
    candidate = api.quantize(imported, samples[:4], api.QuantConfig(int16_activations=())).build()
    truths = [next(iter(reference.run(s).values())) >= 0.5 for s in samples]
    masks = [next(iter(candidate.run(s).values())) >= 0.5 for s in samples]
    inter = sum(int((t & m).sum()) for t, m in zip(truths, masks))
    union = sum(int((t | m).sum()) for t, m in zip(truths, masks))
    per_image = [1.0 if not (t | m).any() else (t & m).sum() / (t | m).sum()
                 for t, m in zip(truths, masks)]  # fmt: skip
    assert api.agreement(reference, candidate, samples, "pooled_iou") == pytest.approx(
        inter / union
    )
    assert api.agreement(reference, candidate, samples, "miou") == pytest.approx(np.mean(per_image))
    assert 0 < inter < union  # the builds differ on some pixels, as a test of the scores needs
    assert inter / union != pytest.approx(np.mean(per_image))  # and the two scores tell apart
