"""fdiff.budget: FLOPs of a training step, and which runs each chapter trains."""

import json
import re
from pathlib import Path

import pytest

from fdiff import UNet, UNetConfig
from fdiff.budget import CHAPTER_RUNS, T4_TFLOPS, _model_flops, gpu_minutes
from fdiff.guided_study import WORLD_RUNS
from fdiff.runs import RUNS

CHAPTERS = Path(__file__).resolve().parents[1] / "chapters"


def test_counting_on_a_small_batch_and_scaling_matches_counting_the_whole_batch():
    model = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_heads=2))
    whole = _model_flops(model, 16, batch=4, probe=4)
    assert whole > 0
    assert _model_flops(model, 16, batch=4, probe=2) == pytest.approx(whole, rel=1e-9)


def test_a_training_step_costs_about_three_forward_passes():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), num_heads=2))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    ratio = _model_flops(model, 16, batch=2) / counter.get_total_flops()
    assert 2.5 < ratio < 3.5  # the backward pass costs about twice the forward


def test_minutes_at_the_assumed_rate():
    assert gpu_minutes(T4_TFLOPS * 1e12 * 60) == pytest.approx(1.0)
    assert gpu_minutes(120e12, tflops=1.0) == pytest.approx(2.0)


@pytest.mark.parametrize("stem", sorted(p.stem for p in CHAPTERS.glob("[0-9][0-9]_*.ipynb")))
def test_every_run_a_chapter_loads_in_its_profile_is_counted(stem):
    assert stem in CHAPTER_RUNS, "every chapter's gpu training is counted"
    text = "".join("".join(c["source"]) for c in
                   json.loads((CHAPTERS / f"{stem}.ipynb").read_text())["cells"]
                   if c["cell_type"] == "code")
    counted = {name for name, _ in CHAPTER_RUNS[stem]}
    assert counted <= set(RUNS)
    literal = set(re.findall(r'load_run\(\s*"([^"]+)",\s*profile', text))
    # f"factorized_{data.dataset}", f"guided_self_{world_name}": the real dataset's run in the
    # gpu profile
    literal |= {f"{m}_pets" for m in
                re.findall(r'load_run\(\s*f"(\w+)_\{(?:data\.dataset|world_name)\}"', text)}
    if "world_study(profile" in text:  # chapter 6: self-guidance on the profile's dataset
        literal |= {name.format("pets") for name in WORLD_RUNS}
    assert literal and literal <= counted, literal - counted


def test_the_paper_profile_keeps_the_paper_scale_and_gpu_is_smaller():
    from fdiff.profiles import get_profile
    from fdiff.runs import resolve_run

    gpu, paper = get_profile("gpu"), get_profile("paper")
    assert gpu.real_data and paper.real_data and not get_profile("cpu").real_data
    assert (paper.train_steps, paper.batch_size, paper.num_res_blocks) == (50_000, 128, 2)
    for name in ("ddpm_pets", "factorized_pets", "ablation_k2"):
        assert resolve_run(name, gpu).train.steps < resolve_run(name, paper).train.steps
