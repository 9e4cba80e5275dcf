import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fdiff.viz import (  # noqa: E402
    _frame_grid,
    animate_frames,
    frame_slider,
    glue,
    partition_explorer,
    partition_frame,
    show_images,
    show_segmentations,
    study_curves,
    to_numpy_image,
)


def test_to_numpy_image_maps_range_and_layout():
    x = torch.stack([torch.full((2, 3), -1.0), torch.zeros(2, 3), torch.ones(2, 3)])
    img = to_numpy_image(x)
    assert img.shape == (2, 3, 3)
    assert img[..., 0].max() == 0 and img[..., 1].min() == 0.5 and img[..., 2].min() == 1
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        to_numpy_image(torch.zeros(1, 3, 2, 2))


def test_frame_grid_lays_out_rows_with_gutters():
    frame = torch.zeros(6, 3, 4, 4)
    assert _frame_grid(frame, nrows=2).shape == (2 * 5 - 1, 3 * 5 - 1, 3)
    with pytest.raises(ValueError, match="equal rows"):
        _frame_grid(frame, nrows=4)


def test_animation_is_scrubbable_html():
    frames = [torch.rand(2, 3, 4, 4) * 2 - 1 for _ in range(3)]
    html = animate_frames(frames, labels=["a", "b", "c"])
    assert 'class="animation"' in html and html.count("data:image/png") >= 3
    # Self-contained: matplotlib's icon-font stylesheet (a CDN link) is gone, its icons are
    # characters, and every button is still there.
    assert "font-awesome" not in html and 'class="fa' not in html and "https://" not in html
    assert html.count("<button") == 9 and "\u25b6" in html
    with pytest.raises(ValueError, match="labels"):
        animate_frames(frames, labels=["a"])
    with pytest.raises(ValueError, match="at least one frame"):
        animate_frames([])


def test_widgets_and_figures_build():
    frames = [torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)]
    view = frame_slider(frames, nrows=2)
    assert view.children[0].max == 1
    fig = show_images(torch.zeros(5, 3, 4, 4), ncols=3, titles=list("abcde"))
    assert len(fig.axes) == 6
    labels = torch.randint(-1, 3, (4, 4, 4))
    fig = show_segmentations(torch.zeros(4, 3, 4, 4), [labels, labels], row_titles=["x", "y", "z"])
    assert len(fig.axes) == 12
    assert glue("unit_test_value", 3) is None  # no stray cell output


def test_glue_hands_the_value_to_myst_nb_without_displaying_it(monkeypatch):
    import sys
    from types import SimpleNamespace

    calls = []
    fake = SimpleNamespace(glue=lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setitem(sys.modules, "myst_nb", fake)
    assert glue("unit_test_value", 3) is None
    assert calls == [(("unit_test_value", 3), {"display": False})]


def test_partition_frame_rows_are_image_masks_and_tinted_argmax():
    images = torch.zeros(2, 3, 4, 4)
    masks = torch.zeros(2, 2, 4, 4)
    masks[:, 0, :, :2] = 1  # left half region 0, right half region 1
    masks[:, 1, :, 2:] = 1
    frame = partition_frame(images, masks, alpha=1.0)
    assert frame.shape == (2 * 4, 3, 4, 4)
    torch.testing.assert_close(frame[:2], images)
    assert (frame[2, :, :, :2] == 1).all() and (frame[2, :, :, 2:] == -1).all()  # mask 1, white
    assert (frame[4, :, :, :2] == -1).all() and (frame[4, :, :, 2:] == 1).all()  # mask 2
    left, right = frame[6, :, 0, 0], frame[6, :, 0, 3]
    assert not torch.equal(left, right)  # two regions, two colours
    assert (frame[6, :, :, :2] == left[:, None, None]).all()  # one colour per region
    assert (frame[6, :, :, 2:] == right[:, None, None]).all()
    as_uint8 = partition_frame(images, (masks * 255).to(torch.uint8), alpha=1.0)
    torch.testing.assert_close(as_uint8, frame)
    with pytest.raises(ValueError, match="same N"):
        partition_frame(images, masks[:1])


def test_partition_explorer_checks_snapshot_shape():
    images = torch.zeros(2, 3, 4, 4)
    masks = torch.full((3, 2, 2, 2, 4, 4), 0.5)
    view = partition_explorer(images, masks, steps=[0, 10, 20], timesteps=[5, 30])
    assert len(view.children) == 2
    with pytest.raises(ValueError, match="S=2"):
        partition_explorer(images, masks, steps=[0, 10], timesteps=[5, 30])


def test_pca_rgb_maps_the_main_direction_to_the_first_channel():
    from fdiff.viz import pca_rgb

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 5, 4, 4, generator=g) * 0.01
    feats[:, 2, :, :2] += 3  # one strong direction: left vs right halves
    rgb = pca_rgb(feats)
    assert rgb.shape == (2, 3, 4, 4) and rgb.min() >= -1 and rgb.max() <= 1
    left, right = rgb[:, 0, :, :2].mean(), rgb[:, 0, :, 2:].mean()
    assert abs(left - right) > 1.5
    # exact, not randomised: the same colours whatever the global random state
    torch.manual_seed(123)
    again = pca_rgb(feats)
    torch.manual_seed(7)
    torch.testing.assert_close(pca_rgb(feats), again, rtol=0, atol=0)
    torch.testing.assert_close(again, rgb, rtol=0, atol=0)


def test_frames_are_drawn_at_size_inches_per_row_with_the_grid_aspect():
    from fdiff.viz import _show_grid

    grid = _frame_grid(torch.zeros(12, 3, 8, 8), nrows=4)  # 4 rows of 3 images
    fig, _, _ = _show_grid(grid, "title", size=1.5, nrows=4)
    width, height = fig.get_size_inches()
    assert height == pytest.approx(1.5 * 4 + 0.3)
    assert width == pytest.approx(1.5 * 4 * grid.shape[1] / grid.shape[0])


def test_study_curves_draws_one_line_per_run_and_dashes_transfers():
    curves = {"a": {"steps": [1, 2, 4], "iou": [0.1, 0.2, 0.3], "gap": [0.0, 0.1, 0.2]},
              "a -> b": {"steps": [0, 4], "iou": [0.5, 0.6], "gap": [0.3, 0.2]}}
    fig = study_curves(curves, {"iou": "IoU", "gap": "gap"})
    left, right = fig.axes
    assert [line.get_linestyle() for line in left.lines] == ["-", "--"]
    assert list(right.lines[1].get_ydata()) == [0.3, 0.2]
    assert left.get_ylabel() == "IoU" and right.get_ylabel() == "gap"
    plt.close(fig)


def test_show_source_displays_the_packages_own_code():
    import inspect

    from fdiff.unet import UNet
    from fdiff.viz import show_source

    shown = show_source(UNet.forward)
    # The method alone, dedented out of its class.
    assert repr(shown).startswith("def forward(") and "class UNet" not in repr(shown)
    assert repr(shown).strip().splitlines()[-1] in inspect.getsource(UNet)
    html = shown._repr_html_()
    assert "<style" not in html and "style=" in html and "forward" in html
    with pytest.raises(TypeError, match="cannot show the source"):
        show_source(3)


def test_glued_values_are_printed_at_the_end_of_their_cell(capsys):
    from IPython.core.interactiveshell import InteractiveShell

    from fdiff import viz

    viz._pending.clear()  # values glued by earlier tests outside a cell
    shell = InteractiveShell.instance()
    try:
        shell.run_cell("from fdiff.viz import glue\nglue('speedup', 23)\nglue('n_fd', 256)\n"
                       "print('cell body')")
        out = capsys.readouterr().out
        # one line, after what the cell itself printed, naming each value as the prose does
        assert out.splitlines()[-1] == "in the text: speedup = 23, n_fd = 256"
        assert out.index("cell body") < out.index("in the text")
        shell.run_cell("x = 1")
        assert "in the text" not in capsys.readouterr().out  # nothing left over for later cells
    finally:
        InteractiveShell.clear_instance()


def test_outline_paints_the_masks_boundary_only():
    from fdiff.viz import outline

    images = torch.zeros(1, 3, 6, 6)
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 1:5, 1:5] = True
    out = outline(images, mask)
    red = (out[0, 0] == 1) & (out[0, 1] == -1)
    ring = mask[0].clone()
    ring[2:4, 2:4] = False
    assert torch.equal(red, ring)
    assert torch.equal(out[0, :, 2:4, 2:4], images[0, :, 2:4, 2:4])
    with pytest.raises(ValueError, match="same size"):
        outline(images, mask[:, :5])
