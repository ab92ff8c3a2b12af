"""The model zoo: presets as data, torchvision parity, the paper's CIFAR counts, the
reference's shapes, and one-line errors for bad architectures."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from resnet_cli import build_model
from resnet_cli.models import BLOCKS, STEMS, ModelConfigError, list_presets, resolve_spec, stage_sizes
from resnet_cli.models.blocks import BasicBlock

from conftest import run_cli

IMAGENET_PRESETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                    "wide_resnet50_2"]
# He et al. 2015, Table 6: parameters of the CIFAR-10 ResNets (option A shortcuts).
CIFAR_COUNTS = {"resnet20": 0.27e6, "resnet32": 0.46e6, "resnet44": 0.66e6, "resnet56": 0.85e6,
                "resnet110": 1.7e6, "resnet1202": 19.4e6}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", IMAGENET_PRESETS)
def test_imagenet_presets_match_torchvision(name):
    torch.manual_seed(0)
    ours, theirs = build_model(name), getattr(torchvision.models, name)()
    assert n_params(ours) == n_params(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


@pytest.mark.parametrize("name,count", CIFAR_COUNTS.items())
def test_cifar_family_matches_the_paper(name, count):
    got = n_params(build_model(name, num_classes=10))
    # the paper rounds to two significant digits
    assert abs(got - count) / count < 0.02, got
    depth = int(name.removeprefix("resnet"))
    spec = resolve_spec(name)
    assert spec.widths == [16, 32, 64] and 6 * spec.layers[0] + 2 == depth


def test_every_preset_builds_and_runs():
    for name in list_presets():
        if name in ("resnet1202", "resnet152", "resnet101", "wide_resnet50_2"):
            continue  # covered by the dedicated (heavier) tests
        m = build_model(name, in_channels=1, num_classes=10)
        out = m(torch.randn(2, 1, 32, 32))
        assert out.shape == (2, 10), name


@pytest.mark.parametrize("name", ["resnet1202", "resnet152"])
def test_deepest_nets_forward_and_backward_on_cpu(name):
    m = build_model(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_reference_block_shapes():
    # seed-reference.md: a 3->3 block keeps 4x3x6x6; a 3->6 block with projection and stride 2 gives 4x6x3x3.
    x = torch.rand(4, 3, 6, 6)
    assert BasicBlock(3, 3, bias=True)(x).shape == (4, 3, 6, 6)
    blk = BasicBlock(3, 6, 2, shortcut="conv", bias=True)
    assert isinstance(blk.downsample[0], nn.Conv2d) and blk.downsample[0].stride == (2, 2)
    assert blk(x).shape == (4, 6, 3, 3)


def test_d2l_reference_network_exactly():
    m = build_model("d2l_resnet18", in_channels=1, num_classes=10)
    assert m.conv1.kernel_size == (7, 7) and m.conv1.stride == (2, 2) and m.conv1.bias is not None
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert all(c.bias is not None for c in convs)  # PyTorch's default biases, unlike torchvision
    # projections are bare 1x1 convs (no BN), only where the shape changes: b3, b4, b5
    assert m.layer1[0].downsample is None
    for stage in (m.layer2, m.layer3, m.layer4):
        assert len(stage[0].downsample) == 1 and stage[1].downsample is None
    # the reference's printed shapes for a 1x1x224x224 input
    shapes = dict(stage_sizes(resolve_spec("d2l_resnet18"), 1, 224))
    assert shapes == {"stem": (1, 64, 56, 56), "layer1": (1, 64, 56, 56), "layer2": (1, 128, 28, 28),
                      "layer3": (1, 256, 14, 14), "layer4": (1, 512, 7, 7)}
    assert m(torch.rand(1, 1, 224, 224)).shape == (1, 10)


def test_xavier_init_on_conv_and_linear_weights_only():
    torch.manual_seed(0)
    m = build_model("d2l_resnet18", in_channels=1, num_classes=10)
    fan_in, fan_out = 512, 10
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert m.fc.weight.abs().max() <= bound and m.fc.weight.abs().max() > 0.9 * bound
    # biases keep PyTorch's default init (not zero), BN stays at 1/0
    assert m.fc.bias.abs().max() > 0 and torch.all(m.bn1.weight == 1)


@pytest.mark.parametrize("block", list(BLOCKS))
@pytest.mark.parametrize("stem", list(STEMS))
def test_blocks_and_stems_combine(block, stem):
    m = build_model({"block": block, "stem": stem, "layers": [1, 1, 1], "widths": [8, 16, 32]},
                    in_channels=3, num_classes=5)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    shapes = stage_sizes(resolve_spec({"block": block, "stem": stem, "layers": [1, 1, 1], "widths": [8, 16, 32]}),
                         3, 32)
    feats = m.forward_features(torch.randn(1, 3, 32, 32))
    assert tuple(feats.shape) == shapes[-1][1]


@pytest.mark.parametrize("name,size", [("resnet50", 95), ("resnet18", 7), ("resnet20", 13), ("preact_resnet18", 1)])
def test_stage_sizes_agree_with_a_real_forward(name, size):
    m = build_model(name, num_classes=10).eval()
    x = torch.randn(1, 3, size, size)
    expected = []
    with torch.no_grad():
        for n in m.stem_names:
            x = getattr(m, n)(x)
        expected.append(("stem", tuple(x.shape)))
        for n in m.stage_names:
            x = getattr(m, n)(x)
            expected.append((n, tuple(x.shape)))
    assert stage_sizes(resolve_spec(name), 3, size) == expected


def test_plain_nets_have_no_skips_but_the_same_layers():
    plain, res = build_model("plain20", num_classes=10), build_model("resnet20", num_classes=10)
    assert n_params(plain) == n_params(res)  # option A shortcuts have no parameters
    blk = plain.layer1[0]
    x = torch.randn(2, 16, 8, 8)
    # a plain block computes relu(F(x)); a residual one relu(F(x) + x)
    f = blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(x)))))
    blk.eval()
    torch.testing.assert_close(blk(x), torch.relu(blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(x)))))))
    assert f.shape == x.shape


def test_zero_init_residual_makes_blocks_start_as_identity():
    m = build_model("resnet18", zero_init_residual=True).eval()
    blk = m.layer1[0]
    x = torch.rand(1, 64, 8, 8)
    torch.testing.assert_close(blk(x), torch.relu(x))


def test_identity_shortcut_pads_channels_without_parameters():
    m = build_model("resnet20", num_classes=10)
    ds = m.layer2[0].downsample
    assert sum(p.numel() for p in ds.parameters()) == 0
    out = ds(torch.ones(1, 16, 8, 8))
    assert out.shape == (1, 32, 4, 4) and out[:, 16:].abs().sum() == 0


def test_in_channels_and_classes_from_arguments_then_config():
    m = build_model("resnet18", in_channels=1, num_classes=7)
    assert m.conv1.in_channels == 1 and m.fc.out_features == 7
    m = build_model({"layers": [1], "widths": [8], "stem": "cifar", "in_channels": 2, "num_classes": 4})
    assert m.conv1.in_channels == 2 and m.fc.out_features == 4


@pytest.mark.parametrize("config,needle", [
    ("resnet19", "unknown preset"),
    ({"block": "fancy"}, "model.block=fancy"),
    ({"stem": "huge"}, "model.stem=huge"),
    ({"layers": [2, 2], "widths": [64]}, "model.layers has 2 stages"),
    ({"layers": [2, 0], "widths": [8, 16]}, "model.layers"),
    ({"layers": [1], "widths": [-8]}, "model.widths"),
    ({"block": "basic", "groups": 32}, "groups"),
    ({"block": "bottleneck", "groups": 32, "width_per_group": 4, "layers": [1], "widths": [8]}, "width_per_group"),
    ({"shortcut": "magic"}, "model.shortcut=magic"),
    ({"colour": "blue"}, "model.colour"),
    ({"residual": False, "zero_init_residual": True}, "model.zero_init_residual=True: needs model.residual=true"),
    ({"stem": "deep", "stem_width": 1}, "model.stem_width=1: the stem's width must be >= 2 for stem=deep"),
    ({"stem": "deep", "layers": [1], "widths": [1]}, "model.widths=[1]: the stem's width must be >= 2"),
])
def test_bad_model_configs_name_the_key(config, needle):
    with pytest.raises(ModelConfigError) as e:
        build_model(config)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_bad_architecture_on_the_command_line_is_one_line(tmp_path):
    proc = run_cli("resnet-train", "data=synthetic", "model=resnet50", "model.widths=[8,8,8,8]",
                   "model.width_per_group=4", "model.groups=32", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: model.widths") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("override,needle", [
    ("model.num_classes=5", "model.num_classes=5: the data has 10 classes (synthetic); set at least 10 or null (from the data)"),
    ("model.in_channels=3", "model.in_channels=3: the data has 1 channel(s) (synthetic); set 1 or null (from the data)"),
])
def test_a_model_that_does_not_fit_the_data_is_one_line(override, needle, tmp_path, monkeypatch, capfd):
    """Before, torch failed mid-step (target out of bounds; a conv's channel mismatch)."""
    from conftest import call_main

    from resnet_cli.train import main

    monkeypatch.chdir(tmp_path)
    code, out, err = call_main(main, "resnet-train", ["data=synthetic", "data.train_size=64", "data.test_size=32",
                                                      "model=resnet20", override], monkeypatch, capfd)
    assert code == 2 and err == f"error: {needle}\n", err
