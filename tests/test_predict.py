"""resnet-predict: image files through evaluation's preprocessing, top-k with class names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import assert_one_error_line, call_main, run_cli
from test_evaluate import tiny_run


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory)


@pytest.fixture(scope="session")
def test_images(run_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's first test images (uint8 N x 1 x 28 x 28), as training's evaluation saw them."""
    from resnet_cli.checkpoint import load_checkpoint
    from resnet_cli.data import load_data

    cfg = load_checkpoint(run_dir / "checkpoints" / "best.pt")["config"]
    data = load_data(cfg["data"], cfg["batch_size"], 8, cfg["seed"], torch.device("cpu"))
    return data.test.images[:8].clone(), data.test.labels[:8].clone()


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory, test_images) -> Path:
    """Test images as PNG (grayscale, lossless), one as RGB (gray in all channels), one larger,
    one corrupt file, one text file that a folder search must ignore."""
    d = tmp_path_factory.mktemp("images")
    images, _ = test_images
    for i in range(4):
        Image.fromarray(images[i, 0].numpy(), "L").save(d / f"gray_{i}.png")
    Image.fromarray(np.repeat(images[0, 0].numpy()[:, :, None], 3, axis=2), "RGB").save(d / "rgb_0.png")
    Image.fromarray(images[1, 0].numpy(), "L").resize((56, 56)).save(d / "large_1.bmp")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    (d / "notes.txt").write_text("not an image")
    return d


def test_folder_json_matches_evaluation_preprocessing(run_dir, image_dir, test_images, tmp_path):
    from resnet_cli.data.transforms import device_batch
    from resnet_cli.inference import open_checkpoint

    proc = run_cli("resnet-predict", f"checkpoint={run_dir / 'checkpoints' / 'best.pt'}", f"inputs={image_dir}",
                   "format=json", "topk=10", "precision=fp32", "device=cpu", timeout=300)
    assert proc.returncode == 1, proc.stderr  # corrupt.png skipped: the others printed, exit 1 as cat does
    results = json.loads(proc.stdout)  # nothing else on stdout
    files = [Path(r["file"]).name for r in results]
    assert files == ["gray_0.png", "gray_1.png", "gray_2.png", "gray_3.png", "large_1.bmp", "rgb_0.png"]
    warnings = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "corrupt.png" in warnings[0]
    assert "Traceback" not in proc.stderr
    for r in results:
        assert len(r["topk"]) == 10
        probs = [c["prob"] for c in r["topk"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert {c["label"] for c in r["topk"]} == set(range(10))
        assert all(c["name"] == f"class_{c['label']}" for c in r["topk"])

    # The same numbers as evaluation's path on the dataset's own tensors (PNG is lossless).
    loaded = open_checkpoint(run_dir / "checkpoints" / "best.pt")
    images, _ = test_images
    with torch.inference_mode():
        expected = loaded.model(device_batch(images[:4], loaded.prep, train=False)).softmax(1)
    by_name = {Path(r["file"]).name: r for r in results}
    for i in range(4):
        got = torch.zeros(10)
        for c in by_name[f"gray_{i}.png"]["topk"]:
            got[c["label"]] = c["prob"]
        assert torch.allclose(got, expected[i], atol=1e-5)
    # RGB with equal channels converts to exactly the grayscale image
    assert by_name["rgb_0.png"]["topk"] == by_name["gray_0.png"]["topk"]


def test_table_default_topk_and_file_list(run_dir, image_dir, monkeypatch, capsys):
    from resnet_cli.predict import main

    inputs = f"{image_dir / 'gray_0.png'},{image_dir / 'large_1.bmp'}"
    code, out, err = call_main(main, "resnet-predict", [f"checkpoint={run_dir}", f"inputs={inputs}"],
                               monkeypatch, capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["file", "rank", "label", "name", "prob"]
    assert len(lines) == 1 + 2 * 5  # topk=5 rows per image, piped: one line per row
    assert all("class_" in line for line in lines[1:]) and "\x1b[" not in out


def test_topk_is_capped_and_unreadable_files_skipped(run_dir, image_dir, monkeypatch, capsys):
    from resnet_cli.predict import main

    inputs = f"{image_dir / 'corrupt.png'},{image_dir / 'missing.png'},{image_dir / 'gray_2.png'}"
    code, out, err = call_main(main, "resnet-predict", [f"checkpoint={run_dir}", f"inputs={inputs}", "topk=50",
                                                        "format=json"], monkeypatch, capsys)
    assert code == 1, err  # two of three skipped
    results = json.loads(out)
    assert len(results) == 1 and len(results[0]["topk"]) == 10
    assert "corrupt.png" in err and "missing.png" in err and "Traceback" not in err


def test_a_folder_without_images_counts_as_skipped_like_a_pattern_without_matches(run_dir, image_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    from resnet_cli.predict import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image")
    for nothing in (tmp_path / "empty", tmp_path / "*.webp"):
        code, out, err = call_main(main, "resnet-predict", [f"checkpoint={run_dir}", "format=json",
                                                            f"inputs={image_dir / 'gray_2.png'},{nothing}"],
                                   monkeypatch, capsys)
        assert code == 1 and len(json.loads(out)) == 1, err
        assert err.startswith(f"warning: {nothing}: ") and err.count("\n") == 1, err


def test_an_empty_folder_a_pattern_matches_is_no_failure(run_dir, image_dir, tmp_path, monkeypatch, capsys):
    """`photos/**` matches every subfolder: one without images among them is not a failure (the
    pattern yielded images); a pattern whose folders hold none is reported like one that matches
    nothing."""
    import shutil

    from resnet_cli.predict import main

    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "empty").mkdir()
    shutil.copy(image_dir / "gray_2.png", photos / "a" / "x.png")
    code, out, err = call_main(main, "resnet-predict", [f"checkpoint={run_dir}", "format=json",
                                                        f"inputs={photos}/**"], monkeypatch, capsys)
    assert code == 0 and err == "", err
    assert [r["file"] for r in json.loads(out)] == [str(photos / "a" / "x.png")]
    code, out, err = call_main(main, "resnet-predict", [f"checkpoint={run_dir}", "format=json",
                                                        f"inputs={image_dir / 'gray_2.png'},{photos}/empt*"],
                               monkeypatch, capsys)
    assert code == 1 and len(json.loads(out)) == 1, err
    assert err.startswith(f"warning: {photos}/empt*: matches no image files") and err.count("\n") == 1, err


def test_flip_tta_averages_an_image_with_its_mirror_image(run_dir, image_dir, tmp_path, monkeypatch, capsys):
    # As resnet-eval scores: the mean of the two views' probabilities. The tiny run did not flip
    # images, so by default (null: as the run scored) predict takes one view.
    from resnet_cli.predict import main

    Image.open(image_dir / "gray_0.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "mirror.png")

    def probs(image: Path, *extra: str) -> torch.Tensor:
        code, out, err = call_main(main, "resnet-predict", [f"checkpoint={run_dir}", f"inputs={image}", "topk=10",
                                                            "format=json", "precision=fp32", *extra], monkeypatch, capsys)
        assert code == 0, err
        got = torch.zeros(10)
        for c in json.loads(out)[0]["topk"]:
            got[c["label"]] = c["prob"]
        return got

    plain, mirror = probs(image_dir / "gray_0.png"), probs(tmp_path / "mirror.png")
    assert not torch.allclose(plain, mirror, atol=1e-4)  # the mirror image is another input
    assert torch.allclose(probs(image_dir / "gray_0.png", "tta_hflip=true"), (plain + mirror) / 2, atol=1e-5)
    assert torch.equal(probs(image_dir / "gray_0.png", "tta_hflip=false"), plain)


def test_load_image_converts_modes(tmp_path):
    from resnet_cli.predict import ImageError, load_image

    Image.new("RGBA", (5, 7), (10, 20, 30, 40)).save(tmp_path / "a.png")
    Image.new("P", (4, 4)).save(tmp_path / "p.gif")
    assert load_image(tmp_path / "a.png", 1).shape == (1, 7, 5)
    assert load_image(tmp_path / "a.png", 3).shape == (3, 7, 5)
    assert load_image(tmp_path / "p.gif", 3).dtype == torch.uint8
    (tmp_path / "x.jpg").write_bytes(b"nope")
    with pytest.raises(ImageError, match="x.jpg"):
        load_image(tmp_path / "x.jpg", 1)


def test_deep_images_are_scaled_or_named_never_clipped(tmp_path):
    """PIL's convert clips a 16-bit PNG to 255 wherever it is above 255 (almost all white)."""
    import numpy as np

    from resnet_cli.predict import ImageError, load_image

    ramp = np.arange(256, dtype=np.uint16).reshape(16, 16)
    for name in ("deep.png", "deep.tif", "deep.pgm"):  # PIL opens the PGM as mode I, like a 32-bit image
        Image.fromarray(ramp * 257).save(tmp_path / name)
        assert load_image(tmp_path / name, 1)[0].tolist() == ramp.tolist(), name
    assert load_image(tmp_path / "deep.png", 3).tolist() == [ramp.tolist()] * 3
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")  # floats in 0..255: as they are
    assert load_image(tmp_path / "float.tif", 1)[0].tolist() == ramp.tolist()
    Image.fromarray(ramp.astype(np.float32) / 255).save(tmp_path / "unit.tif")  # 0..1, the float convention
    assert load_image(tmp_path / "unit.tif", 1)[0].tolist() == ramp.tolist()
    Image.fromarray(ramp.astype(np.int32) * 1000).save(tmp_path / "wide.tif")  # no range to scale from
    with pytest.raises(ImageError, match=r"wide.tif: a 32-bit integer \(I;32S\) image with values 0 to 255000; .* "
                                         r"8-bit, unsigned 16-bit and 0..1 float images"):
        load_image(tmp_path / "wide.tif", 1)
    Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ImageError, match=r"nan.tif: a float image with NaN or infinite values"):
        load_image(tmp_path / "nan.tif", 1)


def test_no_images_found_subprocess(run_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("resnet-predict", f"checkpoint={run_dir}", f"inputs={tmp_path / 'empty'}")
    assert_one_error_line(proc.returncode, proc.stderr, "no images found")
    assert proc.stdout == ""


@pytest.mark.parametrize("case", ["no_inputs", "only_corrupt", "bad_format", "bad_topk", "missing_checkpoint"])
def test_bad_input_in_process(case, run_dir, image_dir, tmp_path, monkeypatch, capsys):
    from resnet_cli.predict import main

    ok = f"inputs={image_dir / 'gray_0.png'}"
    argv, needles = {
        "no_inputs": ([f"checkpoint={run_dir}"], ("inputs: required",)),
        "only_corrupt": ([f"checkpoint={run_dir}", f"inputs={image_dir / 'corrupt.png'}"], ("could be read",)),
        "bad_format": ([f"checkpoint={run_dir}", ok, "format=xml"], ("format=xml",)),
        "bad_topk": ([f"checkpoint={run_dir}", ok, "topk=0"], ("topk=0",)),
        "missing_checkpoint": ([f"checkpoint={tmp_path / 'nope.pt'}", ok], ("nope.pt",)),
    }[case]
    code, out, err = call_main(main, "resnet-predict", argv, monkeypatch, capsys)
    if case == "only_corrupt":  # the skipped file's warning comes first, then the error
        assert err.splitlines()[0].startswith("warning: ")
        err = "\n".join(err.splitlines()[1:])
    assert_one_error_line(code, err, *needles)
    assert out == ""


def test_bracketed_file_names_and_a_home_pattern_print_as_they_are(run_dir, image_dir, tmp_path, monkeypatch, capsys):
    """File names are text, not rich markup ("[draft] a.png" lost its bracket part, "[/x]" was a
    MarkupError); a ~ in a glob pattern means the home folder, as in a plain path."""
    import shutil

    from resnet_cli.predict import main

    home = tmp_path / "home"
    (home / "imgs" / "x[").mkdir(parents=True)
    for name in ("[draft] a.png", "x[/].png"):  # the second path holds "[/]", a closing tag to rich
        shutil.copy(image_dir / "gray_0.png", home / "imgs" / name)
    monkeypatch.setenv("HOME", str(home))
    code, out, err = call_main(main, "resnet-predict", [f"checkpoint={run_dir}", "inputs=~/imgs/*.png,~/imgs",
                                                        "topk=1"], monkeypatch, capsys)
    assert code == 0, err
    assert f"{home / 'imgs' / '[draft] a.png'}" in out and f"{home / 'imgs' / 'x[' / '].png'}" in out


def test_a_file_name_with_glob_characters_is_the_file(image_dir, tmp_path):
    """`big rgb [1].jpg` exists: it is that file, not a pattern that matches `big rgb 1.jpg`."""
    import shutil

    from resnet_cli.predict import find_images

    for name in ("shot [1].png", "shot 1.png", "star*.png"):
        shutil.copy(image_dir / "gray_0.png", tmp_path / name)
    assert find_images([str(tmp_path / "shot [1].png")]) == ([tmp_path / "shot [1].png"], [])
    assert find_images([str(tmp_path / "star*.png")]) == ([tmp_path / "star*.png"], [])
    files, problems = find_images([str(tmp_path / "shot [0-9].png")])  # not a file: a pattern
    assert files == [tmp_path / "shot 1.png"] and not problems


def test_hydras_list_form_of_inputs_is_the_same_list(run_dir, image_dir, monkeypatch, capsys):
    from resnet_cli.predict import main

    files = [image_dir / "gray_0.png", image_dir / "rgb_0.png"]
    code, out, err = call_main(main, "resnet-predict", [f"checkpoint={run_dir}", f"inputs=[{files[0]},{files[1]}]",
                                                        "format=json"], monkeypatch, capsys)
    assert code == 0, err
    assert [r["file"] for r in json.loads(out)] == [str(f) for f in files]
