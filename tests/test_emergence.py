"""scripts/emergence.py: the emergence study runs, records every point, resumes, and its
committed results have the shape chapter 3 plots."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from fdiff.configs import masks_from_json

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "emergence.py"
spec = importlib.util.spec_from_file_location("emergence", SCRIPT)
emergence = importlib.util.module_from_spec(spec)
spec.loader.exec_module(emergence)


def test_the_study_records_each_world_at_each_point_and_resumes_without_work(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "emergence.json"
    argv = ["--profile", "ci", "--test-images", "8", "--out", str(out)]
    assert emergence.main(argv) == 0
    results = json.loads(out.read_text())
    points = results["budget_points"]
    assert points == [1, 2, 4]  # the ci profile's 4 steps at 1/8, 1/4, 1/2 and all of it
    assert len(emergence.STUDY) == len(emergence.WORLDS) + 1
    for w in emergence.STUDY:
        curve = results["worlds"][w]
        assert curve["steps"] == points
        assert all(0 <= v <= 1 for v in curve["iou"] + curve["iou_best"] + curve["largest"])
        diagnostics = results["diagnostics"][w]
        assert set(diagnostics) == set(emergence.DIAGNOSTICS)
        examples = masks_from_json(diagnostics["examples"])
        assert examples.shape == (emergence.EXAMPLES, 16, 16)  # the ci profile's image size
        assert 0 <= examples.min() and examples.max() <= 1
    transfer = results["worlds"]["simple-shapes -> object"]
    assert transfer["steps"] == [0, *points]
    # Everything is cached: a second run measures and trains nothing.
    capsys.readouterr()
    before = out.read_text()
    assert emergence.main(argv) == 0
    printed = capsys.readouterr().out
    assert "step" not in printed and out.read_text() == before


def test_points_are_kept_in_step_order_whatever_order_they_arrive_in(tmp_path):
    results = emergence.Results(tmp_path / "r.json", {"profile": "ci"})
    for step in (4, 1, 2):
        results.record("w", step, {"iou": step / 10, "iou_best": 0.5, "gap": 0.0,
                                   "largest": 1.0})
    curve = json.loads((tmp_path / "r.json").read_text())["worlds"]["w"]
    assert curve["steps"] == [1, 2, 4] and curve["iou"] == [0.1, 0.2, 0.4]
    assert results.has("w", 2) and not results.has("w", 3)


class _OneRegion(torch.nn.Module):
    """A stand-in factorized model whose partition puts every pixel in region 0."""

    num_timesteps = 1000

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(num_regions=2)

    def forward(self, xt, t, return_masks=False, masks=None, **_):
        if masks is None:
            masks = torch.zeros(xt.shape[0], 2, *xt.shape[-2:])
            masks[:, 0] = 1
        eps = torch.zeros_like(xt)
        return (eps, masks) if return_masks else eps


def test_a_partition_of_one_region_finds_no_figure():
    """The label-free rule reads a one-region partition as all background: IoU 0, and never the
    complement of its figure, whatever the labels would prefer."""
    from fdiff.schedules import NoiseSchedule
    from fdiff.worlds import world

    data = world("simple-shapes", 6, 16, split="test")
    point, _ = emergence.measure(_OneRegion(), NoiseSchedule(), data, t=10)
    assert point["iou"] == 0 and point["largest"] == 1
    # The best region per image is the whole image: its IoU is the object's share of it.
    fg = data.batch(range(6))["mask"].float().flatten(1).mean(1)
    assert abs(point["iou_best"] - fg.mean().item()) < 1e-3
