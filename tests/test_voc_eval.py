"""VOC evaluation (py-faster-rcnn conventions) and COCO AP on hand-built cases with hand-computed expectations."""
import json
import math

import numpy as np
import pytest

from edp_det.runtime.errors import DataError
from edp_det.evaluation import voc_eval
from edp_det.evaluation.coco_eval import evaluate_coco
from edp_det.evaluation.voc_eval import box_iou_voc, evaluate_voc, load_detections_json


def G(cat, bbox, difficult=False):
    return {"category": cat, "bbox": list(bbox), "difficult": difficult}


def D(img, cat, bbox, score):
    return {"image_id": img, "category": cat, "bbox": list(bbox), "score": score}


A = [1, 1, 10, 10]  # 10 x 10 pixels under the +1 convention (area 100)


def test_difficult_gt_matched_is_ignored():
    # GT: A (normal), B (difficult). d1 hits B -> ignored (no TP, no FP); d2 hits A -> TP.
    # Positives = 1. Curve: single point (r=1, p=1) -> AP 1 (it would be 0.5 if d1 were counted as FP).
    B = [21, 21, 30, 30]
    ann = {"a": [G("c", A), G("c", B, difficult=True)]}
    dets = [D("a", "c", B, 0.9), D("a", "c", A, 0.8)]
    r = evaluate_voc(dets, ann, ["c"])
    assert r.num_gt["c"] == 1 and r.to_dict()["ap_per_class"]["c"]["num_difficult"] == 1
    assert r.num_det["c"] == 2
    assert r.ap_voc07["c"] == pytest.approx(1.0)
    assert r.ap_area["c"] == pytest.approx(1.0)


def test_difficult_only_detection_below_threshold_is_fp():
    # A detection whose best GT is difficult but with IoU <= 0.5 is a plain FP (ranked first here):
    # curve (r=0,p=0), (r=1,p=1/2) -> AP07 = 0.5, area = 0.5.
    B = [21, 21, 30, 30]
    ann = {"a": [G("c", A), G("c", B, difficult=True)]}
    dets = [D("a", "c", [21, 21, 30, 24], 0.9), D("a", "c", A, 0.8)]  # IoU with B = 40/100 = 0.4
    r = evaluate_voc(dets, ann, ["c"])
    assert r.ap_voc07["c"] == pytest.approx(0.5)
    assert r.ap_area["c"] == pytest.approx(0.5)


def test_duplicate_detection_is_fp():
    # GT A, B. d1 on A (TP), d2 on A again (duplicate -> FP), d3 on B (TP). npos = 2.
    # Points: (r .5, p 1), (r .5, p .5), (r 1, p 2/3).
    # 11-pt: t = 0..0.5 (6 thresholds) -> 1; t = 0.6..1 (5) -> 2/3  => (6 + 10/3) / 11 = 28/33.
    # area: envelope 1 on (0, .5], 2/3 on (.5, 1] => .5 + 1/3 = 5/6.
    Bx = [41, 41, 50, 50]
    ann = {"a": [G("c", A), G("c", Bx)]}
    dets = [D("a", "c", A, 0.9), D("a", "c", [1, 1, 10, 9], 0.8), D("a", "c", Bx, 0.7)]
    r = evaluate_voc(dets, ann, ["c"])
    assert r.ap_voc07["c"] == pytest.approx(28 / 33)
    assert r.ap_area["c"] == pytest.approx(5 / 6)


def test_11point_vs_area_differ_on_same_curve():
    # npos = 3 (one GT per image); d1 TP, d2 FP (no GT in its image), d3 TP; third GT missed.
    # Points: (1/3, 1), (1/3, 1/2), (2/3, 2/3).
    # 11-pt: t = 0, .1, .2, .3 -> 1 (1/3 >= .3); t = .4, .5, .6 -> 2/3; t = .7 .. 1 -> 0  => (4 + 2) / 11 = 6/11.
    # area: 1/3 * 1 + 1/3 * 2/3 = 5/9.
    ann = {"a": [G("c", A)], "b": [G("c", A)], "c": [G("c", A)], "e": []}
    dets = [D("a", "c", A, 0.9), D("e", "c", A, 0.8), D("b", "c", A, 0.7)]
    r = evaluate_voc(dets, ann, ["c"])
    assert r.ap_voc07["c"] == pytest.approx(6 / 11)
    assert r.ap_area["c"] == pytest.approx(5 / 9)
    assert r.ap_voc07["c"] != pytest.approx(r.ap_area["c"])
    np.testing.assert_allclose(r.recall["c"], [1 / 3, 1 / 3, 2 / 3])
    np.testing.assert_allclose(r.precision["c"], [1, 1 / 2, 2 / 3])


def test_iou_boundary_strictly_greater_with_plus_one():
    # GT A: 10x10 = 100 px. Det [1,1,10,5]: 10x5 = 50 px, inside A -> IoU = 50/100 = 0.5 exactly -> NOT a TP.
    assert box_iou_voc(np.array(A), np.array([1, 1, 10, 5])) == 0.5
    ann = {"a": [G("c", A)]}
    r = evaluate_voc([D("a", "c", [1, 1, 10, 5], 0.9)], ann, ["c"])
    assert r.ap_voc07["c"] == 0.0 and r.ap_area["c"] == 0.0
    # Det [1,1,10,5.01]: 10 x 5.01 = 50.1 px -> IoU 0.501 > 0.5 -> TP -> AP 1.
    r = evaluate_voc([D("a", "c", [1, 1, 10, 5.01], 0.9)], ann, ["c"])
    assert r.ap_voc07["c"] == pytest.approx(1.0) and r.ap_area["c"] == pytest.approx(1.0)
    # Without the +1 convention the same pair is 9x4 / 9x9 = 36/81.
    assert box_iou_voc(np.array(A), np.array([1, 1, 10, 5]), pixel_plus_one=False) == pytest.approx(36 / 81)
    # The threshold is an option: at 0.4 the 0.5-IoU detection is a TP.
    r = evaluate_voc([D("a", "c", [1, 1, 10, 5], 0.9)], ann, ["c"], iou_thresh=0.4)
    assert r.ap_voc07["c"] == pytest.approx(1.0) and r.iou_thresh == 0.4


def test_match_only_to_highest_iou_gt():
    # GT A = [1,1,10,10], B = [4,1,13,10]. d1 = A (TP on A). d2 = [2,1,11,10]:
    #   IoU(d2, A) = 90 / 110 = 0.818, IoU(d2, B) = 80 / 120 = 0.667 (> 0.5, and B is still free)
    #   -> d2 is assigned to A only, A is taken -> FP. B stays unmatched.
    # Points (r .5, p 1), (r .5, p .5): 11-pt = 6/11 (t = 0..0.5), area = 0.5.
    Bx = [4, 1, 13, 10]
    d2 = [2, 1, 11, 10]
    assert box_iou_voc(np.array(d2), np.array(A)) == pytest.approx(90 / 110)
    assert box_iou_voc(np.array(d2), np.array(Bx)) == pytest.approx(80 / 120)
    ann = {"a": [G("c", A), G("c", Bx)]}
    r = evaluate_voc([D("a", "c", A, 0.9), D("a", "c", d2, 0.8)], ann, ["c"])
    assert r.ap_voc07["c"] == pytest.approx(6 / 11)
    assert r.ap_area["c"] == pytest.approx(0.5)


def test_detections_match_only_same_image():
    # The GT is in image "a"; a perfect box in image "b" is an FP, so the curve is (0, 0), (1, 1/2).
    ann = {"a": [G("c", A)], "b": []}
    r = evaluate_voc([D("b", "c", A, 0.9), D("a", "c", A, 0.8)], ann, ["c"])
    assert r.ap_voc07["c"] == pytest.approx(0.5) and r.ap_area["c"] == pytest.approx(0.5)


def test_no_detections_ap0_and_no_gt_excluded():
    # "c": perfect (AP 1). "d": GT but no detections (AP 0, counted). "e": no GT at all (None, excluded).
    # "f": only a difficult GT (no positives -> None, excluded). mAP = (1 + 0) / 2.
    ann = {"a": [G("c", A), G("d", [20, 20, 40, 40]), G("f", [50, 50, 60, 60], difficult=True)], "b": []}
    dets = [D("a", "c", A, 0.9), D("b", "e", A, 0.5)]
    r = evaluate_voc(dets, ann, ["c", "d", "e", "f"])
    assert r.ap_voc07 == {"c": pytest.approx(1.0), "d": 0.0, "e": None, "f": None}
    assert r.ap_area["d"] == 0.0 and r.ap_area["e"] is None
    assert r.mAP_voc07 == pytest.approx(0.5) and r.mAP_area == pytest.approx(0.5)
    d = r.to_dict()
    assert set(d) >= {"mAP_voc07", "mAP_area", "ap_per_class", "iou_thresh"}
    assert d["ap_per_class"]["e"] == {"ap_voc07": None, "ap_area": None, "num_gt": 0, "num_difficult": 0,
                                      "num_det": 1}
    assert d["ap_per_class"]["d"]["num_gt"] == 1 and d["ap_per_class"]["d"]["num_det"] == 0
    json.dumps(d, allow_nan=False)  # strictly valid JSON
    table = r.format_table()
    for c in "cdef":
        assert f"\n{c} " in table
    assert "mAP" in table and "0.5000" in table and "-" in table


def test_all_classes_without_gt_gives_null_map():
    r = evaluate_voc([], {"a": []}, ["c"])
    assert r.mAP_voc07 is None and r.to_dict()["mAP_area"] is None


def test_perfect_detections_map_one():
    ann = {
        "i1": [G("cat", [10, 20, 60, 80]), G("dog", [5, 5, 30, 30]), G("cat", [70, 10, 99, 50], difficult=True)],
        "i2": [G("dog", [1, 1, 100, 100])],
        "i3": [],
    }
    dets = [D(img, o["category"], o["bbox"], 0.5 + 0.1 * k) for img, objs in ann.items()
            for k, o in enumerate(objs) if not o["difficult"]]
    r = evaluate_voc(dets, ann, ["cat", "dog"])
    assert r.mAP_voc07 == pytest.approx(1.0) and r.mAP_area == pytest.approx(1.0)
    coco = evaluate_coco(dets, ann, ["cat", "dog"])
    assert coco["coco_ap"] == pytest.approx(1.0, abs=1e-6) and coco["coco_ap50"] == pytest.approx(1.0, abs=1e-6)
    # a detection on the difficult (crowd) region is ignored by COCO as well
    coco = evaluate_coco(dets + [D("i1", "cat", [70, 10, 99, 50], 0.99)], ann, ["cat", "dog"])
    assert coco["coco_ap"] == pytest.approx(1.0, abs=1e-6)


def test_coco_empty_and_no_gt():
    ann = {"i1": [G("cat", [10, 20, 60, 80])]}
    assert evaluate_coco([], ann, ["cat"]) == {"coco_ap": 0.0, "coco_ap50": 0.0}
    out = evaluate_coco([D("i1", "cat", [1, 1, 5, 5], 0.3)], {"i1": []}, ["cat"])
    assert math.isnan(out["coco_ap"]) and math.isnan(out["coco_ap50"])
    # GT VOC [10,20,59,79] = continuous 50 x 60; det VOC [10,20,59,56] = 50 x 37 inside it -> IoU = 37/60 = 0.617.
    # COCO counts a hit when IoU >= t for t in .50, .55, ..., .95: hits at .50, .55, .60 -> AP = 3/10, AP50 = 1.
    out = evaluate_coco([D("i1", "cat", [10, 20, 59, 56], 0.9)], {"i1": [G("cat", [10, 20, 59, 79])]}, ["cat"])
    assert out["coco_ap50"] == pytest.approx(1.0) and out["coco_ap"] == pytest.approx(0.3)


def test_unknown_image_or_category_raises():
    ann = {"a": [G("c", A)]}
    with pytest.raises(DataError, match=r"detections\[0\]\.image_id='zz'"):
        evaluate_voc([D("zz", "c", A, 0.9)], ann, ["c"])
    with pytest.raises(DataError, match=r"detections\[0\]\.category='q'"):
        evaluate_voc([D("a", "q", A, 0.9)], ann, ["c"])
    with pytest.raises(DataError, match="image_id"):
        evaluate_coco([D("zz", "c", A, 0.9)], ann, ["c"])


def _reference_loop(dets, ann, cls, thr):
    """Plain per-detection loop of the VOC07 rules (the spec, written independently of the vectorised code)."""
    R = {img: [o for o in objs if o["category"] == cls] for img, objs in ann.items()}
    used = {img: [False] * len(v) for img, v in R.items()}
    npos = sum(not o["difficult"] for v in R.values() for o in v)
    ds = sorted([d for d in dets if d["category"] == cls], key=lambda d: -d["score"])
    tp, fp = [], []
    for d in ds:
        best, jbest = -np.inf, -1
        for j, o in enumerate(R[d["image_id"]]):
            g, b = o["bbox"], d["bbox"]
            iw = max(min(g[2], b[2]) - max(g[0], b[0]) + 1, 0)
            ih = max(min(g[3], b[3]) - max(g[1], b[1]) + 1, 0)
            inter = iw * ih
            uni = (g[2] - g[0] + 1) * (g[3] - g[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
            iou = inter / uni
            if iou > best:
                best, jbest = iou, j
        if best > thr:
            if R[d["image_id"]][jbest]["difficult"]:
                tp.append(0), fp.append(0)
            elif not used[d["image_id"]][jbest]:
                used[d["image_id"]][jbest] = True
                tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        else:
            tp.append(0), fp.append(1)
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    rec = tp / npos
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(11) / 10:
        ap += (prec[rec >= t].max() if np.any(rec >= t) else 0.0) / 11
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return ap, float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


@pytest.mark.parametrize("chunk", [1 << 22, 3])
def test_vectorised_matches_reference_loop(monkeypatch, chunk):
    monkeypatch.setattr(voc_eval, "_CHUNK_ELEMS", chunk)  # also exercise the chunked IoU path
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    ann, dets = {}, []
    for i in range(25):
        objs = []
        for _ in range(rng.integers(0, 5)):
            x, y = rng.integers(1, 60, size=2)
            w, h = rng.integers(5, 40, size=2)
            objs.append(G(classes[rng.integers(0, 3)], [x, y, x + w, y + h], bool(rng.random() < 0.2)))
        ann[f"img{i}"] = objs
        for o in objs:  # jittered copies (some duplicates) + random boxes
            for _ in range(rng.integers(0, 3)):
                b = np.asarray(o["bbox"], float) + rng.normal(0, 3, size=4)
                dets.append(D(f"img{i}", o["category"], b.tolist(), float(rng.random())))
        for _ in range(rng.integers(0, 3)):
            x, y = rng.integers(1, 60, size=2)
            dets.append(D(f"img{i}", classes[rng.integers(0, 3)], [x, y, x + 20.0, y + 15.0], float(rng.random())))
    r = evaluate_voc(dets, ann, classes)
    for c in classes:
        ap07, aparea = _reference_loop(dets, ann, c, 0.5)
        assert r.ap_voc07[c] == pytest.approx(ap07, abs=1e-12)
        assert r.ap_area[c] == pytest.approx(aparea, abs=1e-12)


# ---------------------------------------------------------------- detections.json validation
def _write(tmp_path, obj, name="dets.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_load_detections_json_ok(tmp_path):
    p = _write(tmp_path, [D("a", "c", [1, 2, 3, 4], 0.5), {**D("b", "c", [1.5, 2, 3, 4], 1), "extra": 1}])
    out = load_detections_json(p, classes=["c"])
    assert out == [D("a", "c", [1.0, 2.0, 3.0, 4.0], 0.5), D("b", "c", [1.5, 2.0, 3.0, 4.0], 1.0)]
    assert load_detections_json(_write(tmp_path, [], "e.json")) == []


@pytest.mark.parametrize(
    "content, pattern",
    [
        ({"a": 1}, r"expected a JSON list"),
        ("[{", r"invalid JSON"),
        ([D("a", "c", A, 0.5), {"image_id": "a", "category": "c", "bbox": A}], r"detections\[1\]: missing key 'score'"),
        ([D("a", "c", [1, 2, 3], 0.5)], r"detections\[0\]\.bbox: expected 4 finite numbers.*\[1, 2, 3\]"),
        ([D("a", "c", [1, 2, "x", 4], 0.5)], r"detections\[0\]\.bbox"),
        ('[{"image_id": "a", "category": "c", "bbox": [1, 1, 5, 5], "score": NaN}]', r"detections\[0\]\.score.*nan"),
        ([D("a", "c", A, True)], r"detections\[0\]\.score"),
        ([D("a", "zebra", A, 0.5)], r"detections\[0\]\.category: unknown category 'zebra'"),
        ([D(3, "c", A, 0.5)], r"detections\[0\]\.image_id"),
        ([D("a", "c", [10, 10, 2, 20], 0.5)], r"detections\[0\]\.bbox: inverted"),
        ([5], r"detections\[0\]: expected an object"),
    ],
)
def test_load_detections_json_errors(tmp_path, content, pattern):
    p = _write(tmp_path, content)
    with pytest.raises(DataError, match=pattern) as ei:
        load_detections_json(p, classes=["c"])
    assert str(p) in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_load_detections_json_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_detections_json(tmp_path / "nope.json")
