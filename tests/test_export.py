"""resnet-export: the standalone file computes what the checkpoint's model computes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from test_evaluate import assert_one_error_line, call_main, tiny_run


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def loaded(run_dir):
    from resnet_cli.inference import open_checkpoint

    return open_checkpoint(run_dir / "checkpoints" / "best.pt")


def check_sidecar(meta: dict, fmt: str, output: Path, run_dir: Path) -> None:
    assert meta["format"] == fmt and meta["file"] == output.name
    assert meta["model"] == "resnet20"
    assert meta["source_checkpoint"] == str((run_dir / "checkpoints" / "best.pt").resolve())
    assert (meta["channels"], meta["input_size"]) == (1, 28)
    assert meta["input_shape"] == ["N", 1, 28, 28]
    assert len(meta["mean"]) == len(meta["std"]) == 1
    assert meta["class_names"] == [f"class_{i}" for i in range(10)] and meta["num_classes"] == 10


def test_torchscript_equals_eager(run_dir, loaded, tmp_path):
    output = tmp_path / "model.pt"
    proc = run_cli("resnet-export", f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", "format=torchscript",
                   f"output={output}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout
    meta = json.loads((tmp_path / "model.pt.json").read_text())
    check_sidecar(meta, "torchscript", output, run_dir)
    assert meta["mean"] == list(loaded.prep.mean) and meta["std"] == list(loaded.prep.std)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        scripted = torch.jit.load(str(output))
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(3))  # a batch size not traced
    with torch.inference_mode():
        assert torch.allclose(scripted(x), loaded.model(x), rtol=1e-5, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_default_output_goes_to_the_run_folder(run_dir, monkeypatch, capsys):
    from resnet_cli.export import main

    code, out, err = call_main(main, "resnet-export", [f"checkpoint={run_dir}", "verify=false"], monkeypatch, capsys)
    assert code == 0, err
    output = run_dir / "export" / "best.torchscript.pt"
    assert output.is_file() and (run_dir / "export" / "best.torchscript.pt.json").is_file()
    assert str(output) in out


def test_onnx_equals_eager(run_dir, loaded, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    from resnet_cli.export import export_metadata, export_model

    output = tmp_path / "model.onnx"
    meta = export_metadata(loaded.prep, "onnx", output, loaded.model_name, loaded.class_names, loaded.path,
                           loaded.epoch)
    export_model(loaded.model, loaded.prep, "onnx", output, meta, verify=False)
    check_sidecar(json.loads((tmp_path / "model.onnx.json").read_text()), "onnx", output, run_dir)

    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    got = torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
    with torch.inference_mode():
        assert torch.allclose(got, loaded.model(x), rtol=1e-4, atol=1e-5)


def test_unknown_format_subprocess(run_dir):
    proc = run_cli("resnet-export", f"checkpoint={run_dir}", "format=tflite")
    assert_one_error_line(proc.returncode, proc.stderr, "format=tflite", "torchscript, onnx")
    assert proc.stdout == ""


@pytest.mark.parametrize("case", ["no_checkpoint_key", "missing", "corrupt", "over_checkpoint", "unknown_key"])
def test_bad_input_in_process(case, run_dir, tmp_path, monkeypatch, capsys):
    from resnet_cli.export import main

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 64)
    best = run_dir / "checkpoints" / "best.pt"
    argv, needles = {
        "no_checkpoint_key": (["format=torchscript"], ("checkpoint: required",)),
        "missing": ([f"checkpoint={tmp_path / 'gone.pt'}"], ("gone.pt", "no such file")),
        "corrupt": ([f"checkpoint={corrupt}"], ("corrupt.pt",)),
        "over_checkpoint": ([f"checkpoint={best}", f"output={best}"], ("the checkpoint itself",)),
        "unknown_key": ([f"checkpoint={best}", "fromat=onnx"], ("fromat: unknown key", "did you mean format")),
    }[case]
    code, out, err = call_main(main, "resnet-export", argv, monkeypatch, capsys)
    assert_one_error_line(code, err, *needles)
    assert out == ""
