"""resnet-export: the standalone file computes what the checkpoint's model computes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import assert_one_error_line, call_main, run_cli
from test_evaluate import tiny_run


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


def export_with_the_command(run_dir: Path, fmt: str, output: Path) -> dict:
    """`resnet-export` as a user runs it; returns the sidecar, checked."""
    proc = run_cli("resnet-export", f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", f"format={fmt}",
                   f"output={output}", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {output}" in proc.stdout and "verified: max |exported - checkpoint model|" in proc.stdout
    meta = json.loads(output.with_name(output.name + ".json").read_text())
    check_sidecar(meta, fmt, output, run_dir)
    return meta


def test_torchscript_equals_eager(run_dir, loaded, tmp_path):
    output = tmp_path / "model.pt"
    meta = export_with_the_command(run_dir, "torchscript", output)
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


@pytest.mark.parametrize("case", ["no_checkpoint_key", "missing", "corrupt", "over_checkpoint", "over_another_checkpoint",
                                  "over_run_results", "unknown_key", "export_as_pt", "torchscript_as_onnx"])
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
        "over_another_checkpoint": ([f"checkpoint={best}", f"output={run_dir / 'checkpoints' / 'last.pt'}"],
                                    ("last.pt exists and is not an earlier export",)),
        "over_run_results": ([f"checkpoint={best}", f"output={run_dir / 'results'}"],
                             ("results.json exists and is not an earlier export",)),
        "unknown_key": ([f"checkpoint={best}", "fromat=onnx"], ("fromat: unknown key", "did you mean format")),
        # a file's suffix is how people and tools tell formats apart
        "export_as_pt": ([f"checkpoint={best}", "format=export", f"output={tmp_path / 'model.torchscript.pt'}"],
                         ("a .pt name is for format=torchscript; format=export writes a torch.export program, so "
                          "name it model.pt2",)),
        "torchscript_as_onnx": ([f"checkpoint={best}", f"output={tmp_path / 'm.onnx'}"],
                                ("a .onnx name is for format=onnx;", "so name it m.pt")),
    }[case]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, out, err = call_main(main, "resnet-export", argv, monkeypatch, capsys)
    assert_one_error_line(code, err, *needles)
    assert out == ""
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_an_export_may_replace_an_earlier_export(run_dir, tmp_path, monkeypatch, capsys):
    from resnet_cli.export import main

    output = tmp_path / "model.pt"
    argv = [f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", f"output={output}", "verify=false"]
    for _ in range(2):
        code, out, err = call_main(main, "resnet-export", argv, monkeypatch, capsys)
        assert code == 0 and f"wrote {output}" in out, err
    output.with_name("model.pt.json").unlink()  # no longer recognisable as an export
    code, out, err = call_main(main, "resnet-export", argv, monkeypatch, capsys)
    assert_one_error_line(code, err, "model.pt exists and is not an earlier export")


def test_torch_export_program_equals_eager(run_dir, loaded, tmp_path):
    output = tmp_path / "model.pt2"
    meta = export_with_the_command(run_dir, "export", output)
    assert meta["load"] == "torch.export.load('model.pt2').module()"

    program = torch.export.load(str(output))
    for n in (1, 5):  # the batch dimension is dynamic, a batch of one included
        x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
        with torch.inference_mode():
            assert torch.allclose(program.module()(x), loaded.model(x), rtol=1e-5, atol=1e-6)


def test_onnx_through_the_command(run_dir, loaded, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    meta = export_with_the_command(run_dir, "onnx", tmp_path / "model.onnx")
    assert (meta["input_name"], meta["output_name"]) == ("input", "logits")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    got = torch.from_numpy(session.run([meta["output_name"]], {meta["input_name"]: x.numpy()})[0])
    with torch.inference_mode():
        assert torch.allclose(got, loaded.model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", ["torchscript", "export"])
def test_verification_catches_a_file_that_computes_something_else(loaded, fmt):
    from resnet_cli.export import ExportMismatch, export_bytes, verify_export
    from resnet_cli.models import build_model

    other = build_model("resnet20", in_channels=1, num_classes=10).eval()  # same shapes, other weights
    data = export_bytes(other, loaded.prep, fmt)
    assert verify_export(other, data, fmt, loaded.prep) <= 1e-5
    with pytest.raises(ExportMismatch, match=rf"the exported {fmt} model's outputs differ .*max \|diff\|"):
        verify_export(loaded.model, data, fmt, loaded.prep)


def test_a_model_that_cannot_be_verified_writes_nothing(run_dir, tmp_path):
    from resnet_cli.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    state["model"]["fc.bias"][0] = float("nan")  # damaged weights: no output to compare with
    damaged = tmp_path / "damaged.pt"
    save_checkpoint(damaged, {k: v for k, v in state.items() if k != "format"})
    output = tmp_path / "model.pt"
    proc = run_cli("resnet-export", f"checkpoint={damaged}", f"output={output}", timeout=300)
    assert_failed_in_one_line(proc.returncode, proc.stderr, "non-finite outputs", "nothing written")
    assert not output.exists() and not (tmp_path / "model.pt.json").exists() and proc.stdout == ""


def assert_failed_in_one_line(code: int, err: str, *needles: str) -> None:
    """A run that failed while running (exit 1), said in one line."""
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def limited_file_size(limit: int):
    """For a child process: writes past `limit` bytes fail with EFBIG, as on a full disk
    (SIGXFSZ ignored, so the write returns the error instead of killing the process)."""
    import resource
    import signal

    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return apply


def test_a_write_error_is_one_line_and_keeps_the_old_file(run_dir, tmp_path):
    import subprocess

    from conftest import command

    output = tmp_path / "model.pt2"
    output.write_bytes(b"the previous export")
    sidecar = tmp_path / "model.pt2.json"
    sidecar.write_text(json.dumps({"file": "model.pt2", "source_checkpoint": "an earlier run"}))
    before = sidecar.read_text()
    proc = subprocess.run([command("resnet-export"), f"checkpoint={run_dir}", "format=export", f"output={output}"],
                          capture_output=True, text=True, timeout=300, preexec_fn=limited_file_size(64_000))
    assert_failed_in_one_line(proc.returncode, proc.stderr, f"cannot write {output}: File too large",
                              "files written before are intact")
    assert output.read_bytes() == b"the previous export" and sidecar.read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("where", ["under_a_file", "device", "sidecar_is_a_folder"])
def test_an_unwritable_output_is_refused_before_exporting(run_dir, tmp_path, where, monkeypatch, capsys):
    from resnet_cli.export import main

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    (tmp_path / "q.pt.json").mkdir()
    output, needle = {"under_a_file": (blocker / "model.pt", f"cannot write there ({blocker} is not a folder)"),
                      "device": (Path("/dev/null"), "exists and is not a regular file"),
                      "sidecar_is_a_folder": (tmp_path / "q.pt", f"its metadata file {tmp_path / 'q.pt.json'} exists "
                                              "and is not a regular file")}[where]
    code, out, err = call_main(main, "resnet-export", [f"checkpoint={run_dir}", f"output={output}"], monkeypatch,
                               capsys)
    assert_one_error_line(code, err, f"output={output}", needle)
    assert out == "" and Path("/dev/null").is_char_device()
    assert not (tmp_path / "q.pt").exists()  # nothing written before the refusal
