"""Task metrics for judging a quantized model: top-1 (and how sure a difference of two is),
detection mAP@0.5, mask IoU.

Without labels, the float model's own answers are the ground truth ("agreement"): its
detections above a score threshold, its thresholded mask. Everything here is numpy.

Detections are ``(boxes [N, 4] as x1, y1, x2, y2; scores [N]; classes [N])``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

YOLOX_STRIDES = (8, 16, 32)


@dataclass
class Detections:
    boxes: np.ndarray  # [N, 4] x1, y1, x2, y2
    scores: np.ndarray  # [N]
    classes: np.ndarray  # [N] int

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, threshold: float) -> Detections:
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.scores[keep], self.classes[keep])


def decode_yolox(
    output: np.ndarray,
    input_hw: tuple[int, int],
    strides=YOLOX_STRIDES,
    score_threshold: float = 0.01,
    iou_threshold: float = 0.45,
) -> Detections:
    """YOLOX's raw head output ``[1, A, 5 + classes]`` to boxes after class-aware NMS.

    Per anchor: ``(x, y)`` offsets from its grid cell and ``log(w, h)``, both in units of the
    stride, then objectness and class probabilities (already sigmoids in the exported model).
    The score of a box is ``objectness x best class probability``.
    """
    pred = np.asarray(output, dtype=np.float64).reshape(-1, output.shape[-1])
    grids, scale = [], []
    for stride in strides:
        h, w = input_hw[0] // stride, input_hw[1] // stride
        ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        grids.append(np.stack([xs, ys], axis=-1).reshape(-1, 2))
        scale.append(np.full((h * w, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(scale)
    if len(grid) != len(pred):
        raise ValueError(
            f"{len(pred)} anchors in the output, but strides {strides} over {input_hw} give "
            f"{len(grid)}"
        )
    centers = (pred[:, :2] + grid) * stride
    sizes = np.exp(np.clip(pred[:, 2:4], -50, 50)) * stride
    classes = np.argmax(pred[:, 5:], axis=1)
    scores = pred[:, 4] * pred[np.arange(len(pred)), 5 + classes]
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)
    found = Detections(boxes, scores, classes).above(score_threshold)
    return nms(found, iou_threshold)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in ``a`` [N, 4] with every box in ``b`` [M, 4] (x1, y1, x2, y2)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(bottom_right - top_left, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(found: Detections, iou_threshold: float = 0.45) -> Detections:
    """Greedy non-maximum suppression within each class, highest score first."""
    keep = []
    for cls in np.unique(found.classes):
        index = np.flatnonzero(found.classes == cls)
        index = index[np.argsort(-found.scores[index], kind="stable")]
        while len(index):
            best, rest = index[0], index[1:]
            keep.append(best)
            overlap = box_iou(found.boxes[best], found.boxes[rest])[0]
            index = rest[overlap <= iou_threshold]
    keep = np.array(sorted(keep, key=lambda i: -found.scores[i]), dtype=np.int64)
    return Detections(found.boxes[keep], found.scores[keep], found.classes[keep])


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision/recall curve with precision made monotone (all points, as in
    PASCAL VOC 2010+ and COCO's per-threshold AP without its 101-point sampling)."""
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.flatnonzero(r[1:] != r[:-1])
    return float(np.sum((r[steps + 1] - r[steps]) * p[steps + 1]))


def map50(truth: list[Detections], predicted: list[Detections], iou: float = 0.5) -> float:
    """Mean over classes (those with ground truth) of AP at IoU ``iou``, over all images.

    Each prediction, highest score first, matches the unmatched ground-truth box of its class
    that it overlaps most, if that IoU reaches ``iou``; otherwise it is a false positive.
    """
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} ground-truth images but {len(predicted)} predicted")
    classes = np.unique(np.concatenate([t.classes for t in truth] + [np.zeros(0, int)]))
    if not len(classes):
        return float("nan")
    aps = []
    for cls in classes:
        total = sum(int(np.sum(t.classes == cls)) for t in truth)
        entries = []  # (score, is true positive)
        for t, p in zip(truth, predicted):
            gt = t.boxes[t.classes == cls]
            mine = np.flatnonzero(p.classes == cls)
            mine = mine[np.argsort(-p.scores[mine], kind="stable")]
            used = np.zeros(len(gt), bool)
            overlaps = box_iou(p.boxes[mine], gt) if len(gt) else np.zeros((len(mine), 0))
            for row, i in enumerate(mine):
                candidates = np.where(used, -1.0, overlaps[row]) if len(gt) else np.zeros(0)
                j = int(np.argmax(candidates)) if len(gt) else -1
                hit = j >= 0 and candidates[j] >= iou
                if hit:
                    used[j] = True
                entries.append((float(p.scores[i]), hit))
        entries.sort(key=lambda e: -e[0])
        hits = np.array([h for _, h in entries], dtype=np.float64)
        tp, fp = np.cumsum(hits), np.cumsum(1.0 - hits)
        recall = tp / total if len(hits) else np.zeros(0)
        precision = tp / np.maximum(tp + fp, 1e-12) if len(hits) else np.zeros(0)
        aps.append(average_precision(recall, precision))
    return float(np.mean(aps))


@dataclass(frozen=True)
class PairedDifference:
    """Top-1 of a candidate less a reference's, both scored on the same samples.

    ``margin`` is the half-width of its 95% interval (normal approximation over the
    per-sample differences, each -1, 0 or +1). Most answers agree, so the interval is set by
    the samples the two answer differently: ``only_reference`` right only for the reference,
    ``only_candidate`` right only for the candidate. A drop of one point on 400 images is a
    handful of such samples, and its margin is about as large as the drop.
    """

    delta: float
    margin: float
    samples: int
    only_reference: int
    only_candidate: int

    def describe(self, reference: str = "reference", candidate: str = "candidate") -> str:
        return (
            f"{100 * self.delta:+.2f} ± {100 * self.margin:.2f} points (95%) over "
            f"{self.samples} samples: {self.only_reference} right only in {reference}, "
            f"{self.only_candidate} only in {candidate}"
        )


def paired_difference(reference_hits, candidate_hits, z: float = 1.96) -> PairedDifference:
    """:class:`PairedDifference` of two per-sample hit vectors (true where the top-1 class is
    the label), the reference's and the candidate's, on the same samples in the same order."""
    a = np.asarray(reference_hits, dtype=bool).ravel()
    b = np.asarray(candidate_hits, dtype=bool).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"hit vectors differ in length or are empty: {a.size} vs {b.size}")
    n = a.size
    only_a, only_b = int(np.count_nonzero(a & ~b)), int(np.count_nonzero(b & ~a))
    delta = (only_b - only_a) / n
    # Sample variance of d = b - a over the n samples, from the two discordant counts.
    variance = ((only_a + only_b) - n * delta * delta) / (n - 1) if n > 1 else 0.0
    return PairedDifference(delta, z * np.sqrt(max(variance, 0.0) / n), n, only_a, only_b)


def mask_iou(truth: np.ndarray, predicted: np.ndarray, threshold: float = 0.5) -> float:
    """IoU of the masks ``truth >= threshold`` and ``predicted >= threshold`` (1.0 when both
    are empty)."""
    a, b = np.asarray(truth) >= threshold, np.asarray(predicted) >= threshold
    union = np.count_nonzero(a | b)
    return 1.0 if union == 0 else np.count_nonzero(a & b) / union


def pooled_mask_iou(truths, predictions, threshold: float = 0.5) -> float:
    """IoU of the masks ``>= threshold`` over a whole set of images: the intersections summed,
    over the unions summed (how VOC and Cityscapes score a class). Unlike the mean of
    :func:`mask_iou` over images, an image whose masks are (nearly) empty weighs by its few
    pixels, not as a whole image scored 0 or 1."""
    inter = union = 0
    for truth, predicted in zip(truths, predictions, strict=True):
        both, either = mask_overlap(truth, predicted, threshold)
        inter, union = inter + both, union + either
    return 1.0 if union == 0 else inter / union


def mask_overlap(truth: np.ndarray, predicted: np.ndarray, threshold: float = 0.5):
    """Pixel counts of the intersection and of the union of the masks ``>= threshold``."""
    a, b = np.asarray(truth) >= threshold, np.asarray(predicted) >= threshold
    return int(np.count_nonzero(a & b)), int(np.count_nonzero(a | b))


def label_miou(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over the classes present in either label map of their IoU (semantic segmentation's
    mIoU, e.g. DeepLab's argmax output against a reference's)."""
    truth, predicted = np.asarray(truth).ravel(), np.asarray(predicted).ravel()
    if truth.shape != predicted.shape:
        raise ValueError(f"label maps differ in size: {truth.size} vs {predicted.size}")
    ious = []
    for label in np.union1d(truth, predicted):
        a, b = truth == label, predicted == label
        ious.append(np.count_nonzero(a & b) / np.count_nonzero(a | b))
    return float(np.mean(ious)) if ious else 1.0
