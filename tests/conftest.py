import os

import pytest
import torch

# Unit tests never depend on the environment's profile or on CUDA.
os.environ.setdefault("FDIFF_PROFILE", "ci")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_unet():
    from fdiff.unet import UNet, UNetConfig

    torch.manual_seed(0)
    return UNet(UNetConfig(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, num_heads=2))
