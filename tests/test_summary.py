"""resnet-summary: layer table, totals, MAC counts, output formats and one-line errors.

Models are built on the meta device (no memory, no FLOPs), so even ResNet-50 costs a
fraction of a second; a handful of cases run the installed command in a subprocess, the
way users call it, and the rest call the functions directly to keep the file fast.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import run_cli
from rich.console import Console

from resnet_cli import summary as S
from resnet_cli.cli import compose
from resnet_cli.models import build_model

# Let rich decide from the pipe alone, whatever the CI's environment forces.
PIPED = {"FORCE_COLOR": "", "TTY_COMPATIBLE": ""}
ANSI = "\x1b["

# d2l_resnet18 at 224x224, as the reference prints it (Fashion-MNIST: 1 channel, 10 classes).
D2L_224_DEPTH1 = [
    ("stem", [1, 64, 56, 56]), ("layer1", [1, 64, 56, 56]), ("layer2", [1, 128, 28, 28]),
    ("layer3", [1, 256, 14, 14]), ("layer4", [1, 512, 7, 7]), ("avgpool", [1, 512, 1, 1]),
    ("flatten", [1, 512]), ("fc", [1, 10]),
]


def meta_model(preset: str, in_channels: int = 3, num_classes: int = 1000):
    with torch.device("meta"):
        return build_model(preset, in_channels, num_classes)


def summary_of(*overrides: str) -> dict:
    cfg = compose("train", list(overrides))
    model, shape = S.build_for_summary(cfg)
    return S.summarize(model, shape, int(cfg.summary.depth))


def hand_count_resnet18_macs(size: int = 224, classes: int = 1000) -> int:
    """ResNet-18's multiply-adds written out from the paper's architecture table."""
    def conv(cin, cout, k, out_side):
        return cin * cout * k * k * out_side * out_side

    s = size // 2
    macs = conv(3, 64, 7, s)  # 7x7/2 stem conv; the 3x3/2 max pool then halves again
    s //= 2
    cin = 64
    for i, width in enumerate((64, 128, 256, 512)):
        if i > 0:
            s //= 2
            macs += conv(cin, width, 1, s)  # 1x1/2 projection shortcut of the stage's first block
        macs += conv(cin, width, 3, s) + conv(width, width, 3, s)  # first block
        macs += 2 * conv(width, width, 3, s)  # second block
        cin = width
    return macs + 512 * classes


# ---------------------------------------------------------------- counts


def test_resnet18_224_macs_and_params_match_published_and_independent_counts():
    result = S.summarize(meta_model("resnet18"), (1, 3, 224, 224), depth=1)
    assert result["total_params"] == 11_689_512  # torchvision's resnet18
    assert result["total_macs"] == pytest.approx(1.82e9, rel=0.01)  # published: 1.81 GFLOPS (= MACs)
    assert result["total_macs"] == hand_count_resnet18_macs()

    # torch's own counter on torchvision's model (FLOPs = 2 x MACs for conv and linear).
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.models import resnet18

    with torch.device("meta"):
        reference = resnet18()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        reference(torch.empty(1, 3, 224, 224, device="meta"))
    assert result["total_macs"] == counter.get_total_flops() // 2
    assert result["total_params"] == sum(p.numel() for p in reference.parameters())
    assert result["param_bytes"] == 4 * 11_689_512


@pytest.mark.parametrize("preset", ["resnet18", "resnet50", "resnet20", "preact_resnet18", "d2l_resnet18",
                                    "plain20"])
def test_totals_equal_parameters_and_top_level_rows_add_up(preset):
    model = meta_model(preset, 3, 10)
    result = S.summarize(model, (1, 3, 32, 32), depth=1)
    total = sum(p.numel() for p in model.parameters())
    assert result["total_params"] == result["trainable_params"] == total
    assert sum(r["params"] for r in result["rows"]) == total
    assert sum(r["macs"] for r in result["rows"]) == result["total_macs"] > 0
    assert result["rows"][0]["name"] == "stem"
    assert [r["name"] for r in result["rows"][-3:]] == ["avgpool", "flatten", "fc"]
    assert result["rows"][-1]["output_shape"] == [1, 10]


def test_conv_macs_respect_groups():
    # ResNeXt's grouped 3x3 convs: in_channels/groups inputs per output element.
    model = meta_model("resnext50_32x4d")
    result = S.summarize(model, (1, 3, 224, 224), depth=4)
    conv2 = next(r for r in result["rows"] if r["name"] == "layer1.0.conv2")
    assert conv2["output_shape"] == [1, 128, 56, 56]
    assert conv2["macs"] == 128 * 56 * 56 * (128 // 32) * 3 * 3
    assert result["total_macs"] == pytest.approx(4.23e9, rel=0.01)  # torchvision: 4.23 GFLOPS


def test_trainable_params_count_only_what_requires_grad():
    model = meta_model("resnet20", 3, 10)
    model.fc.requires_grad_(False)
    result = S.summarize(model, (1, 3, 32, 32), depth=1)
    assert result["total_params"] - result["trainable_params"] == 64 * 10 + 10


# ---------------------------------------------------------------- rows and depth


def test_depth1_rows_of_d2l_resnet18_at_224_are_the_references():
    result = summary_of("model=d2l_resnet18", "data.resize=224", "summary.depth=1")
    assert [(r["name"], r["output_shape"]) for r in result["rows"]] == D2L_224_DEPTH1
    assert result["input_shape"] == [1, 1, 224, 224]
    assert result["rows"][0]["type"] == "Stem"


def test_deeper_levels_add_blocks_then_their_layers():
    model = meta_model("resnet18")
    by_depth = {d: {r["name"]: r for r in S.summarize(model, (1, 3, 64, 64), d)["rows"]} for d in (1, 2, 3, 4)}
    assert "layer1.0" not in by_depth[1] and "conv1" not in by_depth[1]
    # The stem's own modules sit below the stem row, under their real (state_dict) names.
    assert {"stem", "conv1", "bn1", "relu", "maxpool", "layer1.0", "layer4.1"} <= set(by_depth[2])
    assert by_depth[2]["conv1"]["depth"] == 2 and "layer1.0.conv1" not in by_depth[2]
    assert {"layer1.0.conv1", "layer2.0.downsample"} <= set(by_depth[3])
    assert "layer2.0.downsample.0" in by_depth[4] and "layer2.0.downsample.0" not in by_depth[3]
    # Containers include their children; the stem row is its modules together.
    stem = by_depth[2]["stem"]
    assert stem["params"] == sum(by_depth[2][n]["params"] for n in ("conv1", "bn1", "relu", "maxpool"))
    assert stem["output_shape"] == by_depth[2]["maxpool"]["output_shape"]
    assert by_depth[2]["layer1"]["macs"] == by_depth[2]["layer1.0"]["macs"] + by_depth[2]["layer1.1"]["macs"]


def test_preact_rows_include_the_final_norm():
    names = [r["name"] for r in S.summarize(meta_model("preact_resnet18"), (1, 3, 32, 32), 1)["rows"]]
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4", "post_norm", "post_relu", "avgpool",
                     "flatten", "fc"]


def test_summarize_works_on_a_real_model_and_leaves_it_as_it_was():
    model = build_model("resnet20", 3, 10).train()
    result = S.summarize(model, (1, 3, 32, 32), depth=2)
    assert model.training
    assert not any(m._forward_hooks for m in model.modules())
    assert result["total_params"] == 269_722  # He et al.'s 0.27M (option-A shortcuts have no params)


# ---------------------------------------------------------------- input from the config


@pytest.mark.parametrize("overrides, shape, classes", [
    (["data=cifar10"], [1, 3, 32, 32], 10),
    (["data=cifar100", "model=resnet20"], [1, 3, 32, 32], 100),
    (["data=mnist", "data.resize=null"], [1, 1, 28, 28], 10),
    (["data=fashion_mnist"], [1, 1, 96, 96], 10),  # the config's resize
    (["data=synthetic", "data.image_size=20", "data.channels=2", "data.num_classes=7"], [1, 2, 20, 20], 7),
    (["data=imagefolder"], [1, 3, 224, 224], 1000),  # classes unknown without the folders
    (["data=imagefolder", "model.num_classes=5", "summary.input_size=160"], [1, 3, 160, 160], 5),
    (["data=cifar10", "model.in_channels=1", "model.num_classes=2"], [1, 1, 32, 32], 2),
    (["data=cifar10", "summary.input_size=1"], [1, 3, 1, 1], 10),  # padding keeps every stage non-empty
])
def test_input_comes_from_config_and_dataset_facts(overrides, shape, classes):
    result = summary_of(*overrides, "summary.depth=1")
    assert result["input_shape"] == shape
    assert result["rows"][-1]["output_shape"] == [1, classes]


# ---------------------------------------------------------------- rendering


def test_renderers_rich_on_a_terminal_plain_text_otherwise():
    result = S.summarize(meta_model("resnet20", 3, 10), (1, 3, 32, 32), depth=2)
    piped, tty = io.StringIO(), io.StringIO()
    S.emit(result, "table", Console(file=piped, force_terminal=False))
    S.emit(result, "table", Console(file=tty, force_terminal=True, width=160))
    assert ANSI not in piped.getvalue() and ANSI in tty.getvalue()
    for text in (piped.getvalue(), tty.getvalue()):
        assert "layer1.0" in text and "269,722" in text and "Total MACs" in text


def test_piped_table_has_no_escape_codes_and_shows_totals():
    proc = run_cli("resnet-summary", "model=resnet18", "data=cifar10", env=PIPED, check=True)
    assert ANSI not in proc.stdout
    for text in ("layer1.0.conv1", "Total params:", "11,181,642", "Trainable params:", "Total MACs:",
                 "Params size (MB):"):
        assert text in proc.stdout
    assert proc.stderr == ""


def test_json_from_an_unrelated_folder_without_data(tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    env = {**PIPED, "HOME": str(home), "RESNET_CLI_DATA": str(tmp_path / "no-data-here")}
    proc = run_cli("resnet-summary", "model=d2l_resnet18", "data.resize=224", "summary.depth=1",
                   "summary.format=json", cwd=work, env=env, check=True)
    result = json.loads(proc.stdout)
    assert {"model", "input_shape", "rows", "total_params", "trainable_params", "total_macs",
            "param_bytes"} <= set(result)
    assert all({"name", "type", "output_shape", "params", "macs"} <= set(r) for r in result["rows"])
    assert [(r["name"], r["output_shape"]) for r in result["rows"]] == D2L_224_DEPTH1
    assert result["model"] == "d2l_resnet18"
    assert result["total_params"] == sum(r["params"] for r in result["rows"])
    assert list(work.iterdir()) == [] and list(home.iterdir()) == []  # no run folder, no logs, no data


# ---------------------------------------------------------------- bad input


def assert_one_line_error(code: int, stdout: str, stderr: str, *needles: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert stdout == ""
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("args, needles", [
    (["model=resnet19"], ["model=resnet19", "resnet18", "resnet50"]),
    (["model.layers=[2,2]"], ["model.layers", "model.widths"]),
    (["summary.input_size=0"], ["summary.input_size"]),
])
def test_bad_input_from_the_command_is_one_line(args, needles):
    proc = run_cli("resnet-summary", *args, env=PIPED)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, *needles)


@pytest.mark.parametrize("args, needles", [
    (["model.widths=[64,0,128,256]"], ["model.widths"]),
    (["model.layers=[2,-1,2,2]"], ["model.layers"]),
    (["model.groups=2"], ["model.groups"]),  # basic blocks have no grouped convs
    (["model.in_channels=0"], ["model.in_channels"]),
    (["model.block=triple"], ["model.block", "bottleneck"]),
    (["summary.depth=0"], ["summary.depth"]),
    (["summary.format=xml"], ["summary.format", "json"]),
    (["summary.detph=2"], ["summary.depth"]),
    (["data=imagefolder", "data.resize=null"], ["summary.input_size"]),
    (["--cfg", "job"], ["--cfg"]),
    (["--config-dir", "/nonexistent-folder"], ["--config-dir /nonexistent-folder: not a folder"]),
])
def test_bad_input_is_one_line(args, needles, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        S.main(args)
    out, err = capsys.readouterr()
    assert_one_line_error(exit_.value.code, out, err, *needles)


def test_your_own_presets_as_resnet_train_reads_them(tmp_path, capsys):
    """--config-dir adds your groups; --config-name picks your primary config (built on train)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tiny.yaml").write_text("defaults:\n  - resnet20\n  - _self_\nlayers: [1, 1, 1]\n")
    (tmp_path / "mine.yaml").write_text("defaults:\n  - train\n  - _self_\nmodel:\n  widths: [8, 16, 32]\n")
    S.main(["--config-dir", str(tmp_path), "model=tiny", "summary.format=json"])
    tiny = json.loads(capsys.readouterr().out)
    S.main(["--config-dir", str(tmp_path), "--config-name", "mine", "model=tiny", "summary.format=json"])
    narrow = json.loads(capsys.readouterr().out)
    S.main(["model=resnet20", "summary.format=json"])
    full = json.loads(capsys.readouterr().out)
    assert narrow["total_params"] < tiny["total_params"] < full["total_params"]


def test_zero_inner_width_is_one_line(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_:
        S.main(["model=resnext50_32x4d", "model.widths=[8,8,8,8]"])
    out, err = capsys.readouterr()
    assert_one_line_error(exit_.value.code, out, err, "model.")


def test_help_prints_usage(capsys):
    S.main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: resnet-summary") and "summary.depth" in out


def test_frozen_parts_count_as_non_trainable():
    from resnet_cli.cli import compose

    model, shape = S.build_for_summary(compose("train", ["model=resnet20", "model.freeze=[stem,layer1]"]))
    result = S.summarize(model, shape, depth=1)
    frozen = sum(p.numel() for name, p in model.named_parameters() if name.startswith(("conv1", "bn1", "layer1.")))
    assert frozen > 0 and result["total_params"] - result["trainable_params"] == frozen


def test_summary_into_a_closed_pipe_is_quiet():
    import os
    import subprocess

    from conftest import command

    read, write = os.pipe()
    os.close(read)  # a reader that has already gone: `resnet-summary | head -0`
    proc = subprocess.run([command("resnet-summary"), "model=resnet20"], stdout=write, stderr=subprocess.PIPE,
                          text=True, timeout=120)
    os.close(write)
    assert "Traceback" not in proc.stderr and proc.stderr == "", proc.stderr


def test_a_typo_in_your_own_preset_is_named_with_its_likely_key(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "bad.yaml").write_text("defaults:\n  - resnet20\n  - _self_\nblok: basic\n")
    with pytest.raises(SystemExit) as exit_:
        S.main(["--config-dir", str(tmp_path), "model=bad"])
    out, err = capsys.readouterr()
    assert_one_line_error(exit_.value.code, out, err, "model.blok: unknown key (in a config file, not on the command "
                          "line); did you mean model.block?")
