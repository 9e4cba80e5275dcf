import dataclasses

import pytest
import torch

from fdiff.configs import from_json, to_json
from fdiff.unet import UNet, UNetConfig, count_parameters


def _xt(b=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, size, size, generator=g), torch.randint(0, 100, (b,), generator=g)


def test_output_shape_and_features(tiny_unet):
    xt, t = _xt()
    out, feats = tiny_unet(xt, t, return_features=True)
    assert out.shape == xt.shape
    assert len(feats) == len(tiny_unet.decoder.block_names) == 4
    assert [f.shape[1] for f in feats] == tiny_unet.decoder.block_channels
    assert [f.shape[-1] for f in feats] == [4, 4, 8, 8]  # coarsest level first
    torch.testing.assert_close(tiny_unet(xt, t), out)


def test_every_parameter_gets_a_gradient():
    cfg = UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2, cond_dim=5)
    model = UNet(cfg)
    xt, t = _xt()
    model(xt, t, cond=torch.randn(2, 5)).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_condition_changes_the_output_and_none_is_the_null_condition():
    torch.manual_seed(0)
    model = UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2, cond_dim=3))
    xt, t = _xt()
    a = model(xt, t, cond=torch.eye(3)[[0, 1]])
    b = model(xt, t, cond=torch.eye(3)[[2, 2]])
    null = model(xt, t)
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(null, model(xt, t, cond=torch.zeros(2, 3)))


def test_batch_elements_are_independent(tiny_unet):
    xt, t = _xt(4)
    full = tiny_unet(xt, t)
    torch.testing.assert_close(tiny_unet(xt[1:2], t[1:2]), full[1:2], atol=1e-5, rtol=1e-5)


def test_attention_levels_and_widths_are_configurable():
    cfg = UNetConfig(base_channels=8, channel_mults=(1, 2, 4), num_res_blocks=2,
                     attention_levels=(1, 2), num_heads=2)
    model = UNet(cfg)
    attn = [n for n, m in model.named_modules() if type(m).__name__ == "Attention"]
    assert any(n.startswith("encoder") for n in attn) and len(attn) > 2
    # none at the finest level (0), where attention would be costliest
    no_attn = UNet(dataclasses.replace(cfg, attention_levels=(2,)))
    fewer = [n for n, m in no_attn.named_modules() if type(m).__name__ == "Attention"]
    assert 0 < len(fewer) < len(attn)
    plain = UNet(dataclasses.replace(cfg, attention_levels=()))
    middle = [n for n, m in plain.named_modules() if type(m).__name__ == "Attention"]
    assert all(n.startswith("middle") for n in middle)
    out = model(*_xt(1, size=16))
    assert out.shape == (1, 3, 16, 16)
    bigger = UNet(dataclasses.replace(cfg, base_channels=16))
    assert count_parameters(bigger) > 3 * count_parameters(model)


def test_config_round_trip():
    cfg = UNetConfig(base_channels=16, channel_mults=[1, 2], attention_levels=[0], num_heads=2)
    assert from_json(UNetConfig, to_json(cfg)) == cfg
    assert cfg.channel_mults == (1, 2)


def test_replicate_padding_has_no_border_artefact():
    # A flat image carries no information about where its border is. With replicate padding
    # every layer keeps it flat, so the predicted noise is the same at every pixel; zero
    # padding makes the outermost pixels differ.
    flat = torch.full((1, 3, 16, 16), 0.3)
    t = torch.tensor([40])
    spread = {}
    for mode in ("zeros", "replicate"):
        torch.manual_seed(0)
        cfg = UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2, padding_mode=mode)
        out = UNet(cfg)(flat, t)
        spread[mode] = (out - out[..., 8:9, 8:9]).abs().max().item()
    assert spread["replicate"] < 1e-5
    assert spread["zeros"] > 1e-3


def test_padding_mode_round_trips():
    cfg = UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2, padding_mode="replicate")
    assert to_json(cfg)["padding_mode"] == "replicate"
    assert from_json(UNetConfig, to_json(cfg)) == cfg
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        UNetConfig(padding_mode="mirror")


def test_bad_inputs_raise_clear_errors(tiny_unet):
    xt, t = _xt()
    with pytest.raises(ValueError, match="not divisible by 2"):
        tiny_unet(torch.randn(2, 3, 9, 9), t)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_unet(torch.randn(2, 1, 8, 8), t)
    with pytest.raises(TypeError, match="int64"):
        tiny_unet(xt, t.float())
    with pytest.raises(TypeError, match="floating-point"):
        tiny_unet(xt.long(), t)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_unet(xt, t, cond=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="divisible by groups"):
        UNetConfig(base_channels=12, groups=8)
    with pytest.raises(ValueError, match="attention_levels"):
        UNetConfig(channel_mults=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="no field 'widths'"):
        from_json(UNetConfig, {"widths": 3})
    cond_model = UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), num_heads=2, cond_dim=3))
    with pytest.raises(ValueError, match=r"cond must have shape \(2, 3\)"):
        cond_model(xt, t, cond=torch.zeros(2, 4))
