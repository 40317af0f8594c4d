"""CIFAR ResNets: PyCIL's parameter-free (option A) shortcuts as an option, counted and checked by hand."""
from __future__ import annotations

import pytest
import torch

from harness.core.backbones import BasicBlock, ZeroPadShortcut, build_backbone
from harness.errors import ConfigError


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_resnet32_with_zero_pad_shortcuts_has_pycils_parameter_count() -> None:
    # stem 3*16*9 + BN 32 = 464; stage 1: 5 x (2 x 16*16*9 + 2 x 32) = 23,360;
    # stage 2: 16*32*9 + 32*32*9 + 2 x 64 + 4 x (2 x 32*32*9 + 2 x 64) = 88,192;
    # stage 3: 32*64*9 + 64*64*9 + 2 x 128 + 4 x (2 x 64*64*9 + 2 x 128) = 351,488  ->  463,504
    # (PyCIL's resnet32 with its unused 64 -> 10 fc: 464,154.) Projection shortcuts add 1x1 conv + BN twice:
    # 16*32 + 64 + 32*64 + 128 = 2,752.
    assert _count(build_backbone("resnet32", shortcut="zero_pad")) == 463_504
    assert _count(build_backbone("resnet32")) == 463_504 + 2_752
    assert build_backbone("resnet32", shortcut="zero_pad").out_dim == 64


def test_zero_pad_shortcut_subsamples_and_appends_zero_channels() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = ZeroPadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, :16], x[:, :, ::2, ::2])          # PyCIL: AvgPool2d(kernel 1, stride 2)
    assert torch.equal(out[:, 16:], torch.zeros(2, 16, 4, 4))
    block = BasicBlock(16, 32, stride=2, shortcut="zero_pad").eval()
    assert isinstance(block.shortcut, ZeroPadShortcut)
    with torch.no_grad():
        main = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(x)))))
        assert torch.allclose(block(x), torch.relu(main + out))


def test_shortcut_option_errors() -> None:
    with pytest.raises(ConfigError, match="resnet_shortcut"):
        build_backbone("resnet32", shortcut="conv")
    with pytest.raises(ConfigError, match="applies to"):
        build_backbone("tiny_cnn", shortcut="zero_pad")
