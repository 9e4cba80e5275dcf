"""fdiff.guided_study: chapter 6's measurements, run end to end on the ci profile's tiny models."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fdiff import get_profile
from fdiff.annotate import cluster_scores, pooled_features, self_annotate
from fdiff.guided_study import (
    DEEP_RUNS,
    SCALES,
    SPLIT_RUN,
    cluster_match,
    diversity,
    feature_choice,
    guidance_study,
    mask_iou,
    same_shapes_baseline,
    world_study,
)
from fdiff.runs import resolve_run
from fdiff.schedules import NoiseSchedule
from fdiff.unet import UNet, UNetConfig
from fdiff.worlds import world


def test_mask_iou_per_image():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    b = torch.zeros(3, 4, 4, dtype=torch.bool)
    a[0, :2], b[0, :1] = True, True  # 4 of 8 pixels shared
    a[1, 0, 0] = True  # disjoint from an empty mask
    # image 2: both empty, which counts as agreement
    assert mask_iou(a, b).tolist() == pytest.approx([0.5, 0.0, 1.0])


def test_diversity_is_the_mean_pairwise_distance():
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    # pairs (0,1) and (1,2) are 5 apart, (0,2) 0 apart: mean over the 3 pairs
    assert diversity(feats) == pytest.approx(10 / 3)


def test_same_shapes_baseline_weighs_the_true_label_match_by_the_pure_clusters_shapes():
    # cluster 0: three images of class 0 (pure); cluster 1: two of class 1 (pure);
    # cluster 2: one of class 0 and one of class 2 (mixed, left out)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    classes = torch.tensor([0, 0, 0, 1, 1, 0, 2])
    # pure images: three of class 0, two of class 1
    assert same_shapes_baseline(ids, classes, 3, [0.9, 0.4, 0.1]) == pytest.approx(
        (3 * 0.9 + 2 * 0.4) / 5)
    # a class never measured (None) is left out of the mix
    assert same_shapes_baseline(ids, classes, 3, [0.9, None, 0.1]) == pytest.approx(0.9)
    # no pure cluster: no baseline
    assert same_shapes_baseline(torch.tensor([0, 0]), torch.tensor([0, 1]), 1,
                                [0.5, 0.5]) is None


def test_the_study_measures_every_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path))
    n = 5  # one sample of each class asked for
    out = guidance_study(get_profile("ci"), n=n, train=True, progress=False)
    assert out["n"] == n and out["scales"] == list(SCALES)
    assert all(sha is None for sha in out["sha256"].values())  # trained here, not committed
    assert out["fd_seed_spread"] >= 0
    for key in ("class", "self", "layout"):
        assert set(out[key]) == {str(w) for w in SCALES}
    for w in SCALES:
        row = out["class"][str(w)]
        # each class asked for once: the overall match is the mean of the per-class ones
        assert len(row["match_by_class"]) == 5
        assert sum(row["match_by_class"]) / 5 == pytest.approx(row["class_match"], abs=1e-3)
        assert 0 <= row["class_match"] <= row["recognised"] <= 1
        self_row = out["self"][str(w)]
        assert 0 <= self_row["class_match"] <= self_row["recognised"] <= 1
        if out["self_pure_share"] > 0:
            assert 0 <= self_row["pure_match"] <= 1
        assert 0 <= out["layout"][str(w)]["layout_iou"] <= 1
    assert 0 < out["self_asked_purity"] <= 1 and 0 <= out["self_pure_share"] <= 1
    assert set(out["clusters"]) == {"10", "20", "50"}
    for r in out["clusters"].values():
        assert 0 <= r["nmi"] <= 1 and 0 < r["purity"] <= 1 and 0 <= r["class_match"] <= 1
    # the 50 clusters are guided_self's: the main part's samples at w = 2, not drawn again
    assert out["clusters"]["50"]["class_match"] == out["self"]["2.0"]["class_match"]
    lt = out["longtail"]
    assert len(lt["class_counts"]) == 5 and sum(lt["self_clusters_per_class"]) <= 50
    deep = out["features"]
    assert set(deep) == set(DEEP_RUNS)
    assert set(deep["guided_self-deep"]) >= {str(w) for w in SCALES}
    assert deep["guided_self-deep-k20"]["k"] == 20
    for r in deep.values():
        assert r["blocks"] == [0] and 0 <= r["nmi"] <= 1 and 0 < r["purity"] <= 1
        assert 0 <= r["2.0"]["class_match"] <= r["2.0"]["recognised"] <= 1
        assert r["2.0"]["fd"] >= 0
    # the diagnostic's clusters never mix classes: purity 1, every sample asked for a pure one
    split = out["split"]
    assert split["k"] == 20 and split["blocks"] == [0]
    assert split["purity"] == 1.0 and split["pure_share"] == 1.0
    assert set(split) >= {"0.0", "2.0"}
    assert split["2.0"]["pure_match"] == split["2.0"]["class_match"]
    assert out["sha256"][SPLIT_RUN] is None
    # twice the steps: the same measurements, self-labels and true classes at w = 0 and 2
    long = out["long"]
    assert long["steps_factor"] == 2 and long["self"]["k"] == 20
    for key in ("self", "class"):
        assert set(long[key]) >= {"0.0", "2.0"}
        assert 0 <= long[key]["2.0"]["class_match"] <= long[key]["2.0"]["recognised"] <= 1


def test_cluster_match_puts_the_annotated_images_back_in_their_own_clusters():
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_heads=2)).eval()
    schedule = NoiseSchedule("cosine", 100)
    images = world("simple-shapes", 40, 16).batch(list(range(40)))["image"]
    labels = self_annotate(pooled_features(model, schedule, images, 20, noise_seed=3,
                                           progress=False), 4)
    # the annotation's own images, features and noise: every image is in its own cluster
    assert cluster_match(model, schedule, labels, images, labels.ids, 20, 3) == 1.0
    # asked for the next cluster instead: none is
    assert cluster_match(model, schedule, labels, images, (labels.ids + 1) % 4, 20, 3) == 0.0
    # the share, for half the images asked right
    half = torch.where(torch.arange(40) < 20, labels.ids, (labels.ids + 1) % 4)
    assert cluster_match(model, schedule, labels, images, half, 20, 3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="one cluster per image"):
        cluster_match(model, schedule, labels, images, labels.ids[:5], 20, 3)
    # an annotation of the deepest block alone is matched on that block's features
    deep = self_annotate(pooled_features(model, schedule, images, 20, noise_seed=3,
                                         progress=False, blocks=(0,)), 4)
    assert cluster_match(model, schedule, deep, images, deep.ids, 20, 3, blocks=(0,)) == 1.0


def test_the_world_study_measures_self_guidance_on_the_textured_world(tmp_path, monkeypatch):
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path))
    out = world_study(get_profile("ci"), "shapes", n=6, train=True, progress=False)
    assert out["dataset"] == "shapes" and out["n"] == 6 and out["k"] == 50
    assert set(out["sha256"]) == {"ddpm_shapes", "guided_none_shapes", "guided_self_shapes"}
    assert all(sha is None for sha in out["sha256"].values())  # trained here
    assert 0 <= out["nmi"] <= 1 and 0 < out["purity"] <= 1 and out["num_labels"] == 5
    assert 0 <= out["ceiling"] <= 1 and out["fd_seed_spread"] >= 0
    rows = [out["unguided"], *out["self"].values()]
    assert set(out["self"]) == {"0.0", "2.0"}
    for row in rows:
        assert 0 <= row["cluster_match"] <= 1 and row["fd"] > 0 and row["diversity"] > 0
    assert out["unguided"]["fd_other_seed"] > 0


def test_feature_choice_scores_every_setting_and_matches_a_clustering_by_hand(tiny_unet):
    schedule = NoiseSchedule("cosine", 100)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, 8, 8, generator=gen) * 2 - 1
    classes = torch.randint(0, 3, (40,), generator=gen)
    rows = feature_choice(tiny_unet, schedule, images, classes, steps=(100, 300),
                          block_sets=((0,), ()), ks=(3, 5))  # steps out of 1000: t = 10, 30
    assert [(r["t"], r["blocks"], r["k"]) for r in rows] == [
        (t, b, k) for t in (10, 30) for b in ([0], []) for k in (3, 5)]
    for r in rows:
        assert 0 <= r["agreement"] <= 1 and 0 <= r["nmi"] <= 1
        assert 0 < r["purity"] <= 1 and 0 <= r["pure_share"] <= 1
    by_hand = self_annotate(pooled_features(tiny_unet, schedule, images, 30, progress=False,
                                            blocks=(0,)), 5)
    assert rows[5]["nmi"] == round(cluster_scores(by_hand.ids, classes)["nmi"], 4)
    averaged = feature_choice(tiny_unet, schedule, images, classes, steps=(100,), ks=(3,),
                              views=3)
    assert len(averaged) == 1 and averaged[0]["views"] == 3 and averaged[0]["blocks"] == []
    with pytest.raises(ValueError, match="one class per image"):
        feature_choice(tiny_unet, schedule, images, classes[:5])
    with pytest.raises(ValueError, match="views must be at least 1"):
        feature_choice(tiny_unet, schedule, images, classes, views=0)


def test_the_feature_choice_script_prints_and_writes_its_rows(tmp_path, monkeypatch, capsys):
    script = Path(__file__).resolve().parents[1] / "scripts" / "self_label_features.py"
    spec = importlib.util.spec_from_file_location("self_label_features", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("FDIFF_CACHE", str(tmp_path / "cache"))
    built = []

    def untrained(name, profile):  # the script's plumbing, without training its model
        built.append(name)
        return resolve_run(name, profile).build_model().eval(), {}

    monkeypatch.setattr(module, "load_run", untrained)
    out = tmp_path / "rows.json"
    argv = ["--profile", "ci", "--n", "30", "--k", "3", "--steps", "150", "--blocks", "0", "all",
            "--out", str(out)]
    assert module.main(argv) == 0
    assert built == ["ddpm_simple-shapes"]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["blocks"], r["k"]) for r in rows] == [([0], 3), ([], 3)]
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0].startswith("simple-shapes, 30 images") and "agreement" in printed[1]
    assert len(printed) == 4 and printed[3].split()[1] == "all"
    with pytest.raises(SystemExit):
        module.main(["--profile", "ci", "--blocks", "deepest"])
