"""Metrics against hand-computed values and a plain NumPy transcription of BTS's compute_errors (issue 5)."""

import math

import numpy as np
import pytest

from spd.metrics import METRIC_NAMES, MetricAccumulator, depth_metrics


def bts_compute_errors(gt, pred):
    """BTS `compute_errors` (bts/pytorch/bts_eval.py), transcribed."""
    thresh = np.maximum((gt / pred), (pred / gt))
    d1 = (thresh < 1.25).mean()
    d2 = (thresh < 1.25**2).mean()
    d3 = (thresh < 1.25**3).mean()
    rms = np.sqrt(((gt - pred) ** 2).mean())
    log_rms = np.sqrt(((np.log(gt) - np.log(pred)) ** 2).mean())
    abs_rel = np.mean(np.abs(gt - pred) / gt)
    sq_rel = np.mean(((gt - pred) ** 2) / gt)
    err = np.log(pred) - np.log(gt)
    silog = np.sqrt(np.mean(err**2) - np.mean(err) ** 2) * 100
    log10 = np.mean(np.abs(np.log10(gt) - np.log10(pred)))
    return dict(silog=silog, log10=log10, abs_rel=abs_rel, sq_rel=sq_rel, rmse=rms, rmse_log=log_rms,
                delta1=d1, delta2=d2, delta3=d3)


def test_hand_computed_values():
    gt = np.array([1.0, 2.0, 4.0, 5.0])
    pred = np.array([1.0, 2.5, 3.0, 10.0])
    m = depth_metrics(pred, gt)
    assert m["abs_rel"] == pytest.approx((0 + 0.25 + 0.25 + 1.0) / 4)
    assert m["sq_rel"] == pytest.approx((0 + 0.125 + 0.25 + 5.0) / 4)
    assert m["rmse"] == pytest.approx(math.sqrt((0 + 0.25 + 1 + 25) / 4))
    assert m["delta1"] == pytest.approx(0.25)  # ratios 1, 1.25 (not < 1.25), 1.333, 2
    assert m["delta2"] == pytest.approx(0.75)
    assert m["delta3"] == pytest.approx(0.75)
    logs = np.log([1.0, 1.25, 0.75, 2.0])
    assert m["rmse_log"] == pytest.approx(math.sqrt(np.mean(logs**2)))
    assert m["silog"] == pytest.approx(100 * math.sqrt(np.mean(logs**2) - np.mean(logs) ** 2))
    assert m["log10"] == pytest.approx(np.mean(np.abs(np.log10([1.0, 1.25, 0.75, 2.0]))))


def test_matches_bts_on_random_data():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.0, 11.0, size=(48, 64))
    gt[rng.random(gt.shape) < 0.2] = 0  # holes
    pred = gt * rng.uniform(0.7, 1.4, size=gt.shape) + rng.normal(0, 0.05, size=gt.shape)
    pred = np.abs(pred) + 1e-4
    mask = np.zeros_like(gt, dtype=bool)
    mask[5:40, 3:60] = True
    ours = depth_metrics(pred, gt, mask)
    valid = (gt > 1e-3) & (gt < 10) & mask
    theirs = bts_compute_errors(gt[valid], np.clip(pred[valid], 1e-3, 10))
    for name in METRIC_NAMES:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-6, abs=1e-9), name


def test_clamping_and_empty():
    m = depth_metrics(np.array([np.nan, np.inf, 20.0]), np.array([1.0, 9.0, 9.0]))
    assert m["delta1"] == pytest.approx(2 / 3)  # nan -> 1e-3 (wrong), inf -> 10, 20 -> 10 (both < 1.25x)
    assert depth_metrics(np.ones(3), np.zeros(3)) is None


def test_accumulator_is_the_mean_of_images():
    acc = MetricAccumulator()
    a = depth_metrics(np.array([1.0, 2.0]), np.array([1.0, 1.0]))
    b = depth_metrics(np.array([1.0]), np.array([1.0]))
    acc.update(a)
    acc.update(b)
    acc.update(None)
    out = acc.compute()
    assert out["abs_rel"] == pytest.approx((a["abs_rel"] + b["abs_rel"]) / 2)
    assert acc.count == 2
    assert acc.skipped == 1
