"""Every refusal of `pipeline/convert.py`: exit status 2, one line `error: ...` naming the problem,
and nothing written (no output directory, no temporary left behind, an existing one untouched)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.convert import main
from tests.distributed.worker_hf_checkpoint import make_hf_model, make_tokenizer, write_checkpoint

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_errors")
    write_checkpoint(root / "run", make_tokenizer(root / "tokenizer", 1000), [], reference=False)
    make_hf_model(root / "hf")
    return root


def copy_of(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit:
        edit(dst)
    return dst


def refused(capsys, argv: list[str]) -> str:
    """Run the entry point; it must exit 2 with one `error:` line. Returns that line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2, f"exit status {info.value.code}, stderr: {err}"
    assert err.startswith("error: ") and "\n" not in err, f"not one error line: {err!r}"
    return err


def nothing_written(parent: Path, target: str) -> None:
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{target}.")]
    assert not (parent / target).exists(), f"{target} was created"
    assert not leftovers, f"temporary directories left behind: {leftovers}"


def edit_json(path: Path, **changes) -> None:
    content = json.loads(path.read_text())
    content.update(changes)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize(
    "argv, expected", [(["export"], "required: checkpoint, out_dir"), (["frob"], "invalid choice: 'frob'")]
)
def test_usage_errors_follow_the_exit_convention(capsys, argv, expected):
    assert expected in refused(capsys, argv)


def test_export_missing_checkpoint(capsys, tmp_path):
    err = refused(capsys, ["export", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert "does not exist" in err
    nothing_written(tmp_path, "out")


def test_export_incomplete_checkpoint(capsys, sources, tmp_path):
    step = copy_of(sources / "run" / "checkpoints" / "step_0000000", tmp_path / "step_0000000")
    (step / "COMPLETE").unlink()
    err = refused(capsys, ["export", str(step), str(tmp_path / "out")])
    assert "incomplete" in err and "COMPLETE" in err
    nothing_written(tmp_path, "out")


def test_export_run_without_complete_checkpoint(capsys, sources, tmp_path):
    run = copy_of(sources / "run", tmp_path / "run")
    (run / "checkpoints" / "step_0000000" / "COMPLETE").unlink()
    err = refused(capsys, ["export", str(run), str(tmp_path / "out")])
    assert "no complete checkpoint" in err
    nothing_written(tmp_path, "out")


@pytest.mark.parametrize("command, source", [("export", "run"), ("import", "hf")])
def test_writing_into_a_non_empty_directory_needs_overwrite(capsys, sources, tmp_path, command, source):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = refused(capsys, [command, str(sources / source), str(out)])
    assert "not empty" in err and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_export_overwrite_replaces_the_directory(capsys, sources, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    main(["export", str(sources / "run"), str(out), "--overwrite"])
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_export_shapes_that_disagree_with_the_config(capsys, sources, tmp_path):
    def widen(run):
        meta = run / "checkpoints" / "step_0000000" / "meta.json"
        content = json.loads(meta.read_text())
        content["model"]["ffn_hidden_size"] = 256
        meta.write_text(json.dumps(content))

    run = copy_of(sources / "run", tmp_path / "run", widen)
    err = refused(capsys, ["export", str(run), str(tmp_path / "out")])
    assert "mlp.linear_fc1.weight" in err and "[192, 96]" in err and "[256, 96]" in err
    nothing_written(tmp_path, "out")


def test_export_without_a_usable_tokenizer(capsys, sources, tmp_path):
    err = refused(
        capsys, ["export", str(sources / "run"), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "none")]
    )
    assert "tokenizer" in err and "does not exist" in err
    nothing_written(tmp_path, "out")


@pytest.mark.parametrize(
    "case, changes, expected",
    [
        ("model type", {"model_type": "llama"}, "model_type='llama'"),
        (
            "MoE layer without its weights",
            {
                "layers_block_type": [
                    "linear_attention",
                    "moe",
                    "mlp",
                    "linear_attention",
                    "mlp",
                    "full_attention",
                    "linear_attention",
                    "linear_attention",
                    "mlp",
                ]
            },
            "has no tensor backbone.layers.1.mixer.gate.weight",
        ),
        ("shapes", {"intermediate_size": 256}, "mixer.up_proj.weight"),
    ],
)
def test_import_refuses_what_it_cannot_represent(capsys, sources, tmp_path, case, changes, expected):
    hf = copy_of(sources / "hf", tmp_path / "hf", lambda d: edit_json(d / "config.json", **changes))
    err = refused(capsys, ["import", str(hf), str(tmp_path / "out")])
    assert expected in err, f"{case}: {expected!r} missing from {err!r}"
    nothing_written(tmp_path, "out")


def test_import_missing_directory(capsys, tmp_path):
    err = refused(capsys, ["import", str(tmp_path / "nope"), str(tmp_path / "out")])
    assert "does not exist" in err
    nothing_written(tmp_path, "out")


def test_import_with_a_bad_layout_override(capsys, sources, tmp_path):
    # 8 Mamba heads do not split over 3 TP ranks: refused before any worker starts.
    err = refused(capsys, ["import", str(sources / "hf"), str(tmp_path / "out"), "parallel.tp=3"])
    assert "parallel.tp=3" in err
    nothing_written(tmp_path, "out")


@pytest.mark.parametrize("entry", [["pipeline/convert.py"], ["-m", "pipeline.convert"]])
def test_entry_points_run_from_any_directory(sources, tmp_path, entry):
    # As a script, Python puts pipeline/ first on sys.path: the entry point must still find the package.
    script = [str(REPO / entry[0])] if len(entry) == 1 else entry
    env = dict(os.environ, PYTHONPATH=str(REPO) if len(entry) == 2 else "")
    proc = subprocess.run(
        [sys.executable, *script, "export", str(sources / "run"), str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "config.json").is_file()
    bad = subprocess.run(
        [sys.executable, *script, "export", str(tmp_path / "nope"), str(tmp_path / "x")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: ") and "\n" not in bad.stderr.strip(), (
        bad.stderr
    )


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["itself", "inside", "parent"])
@pytest.mark.parametrize("command, source", [("export", "run"), ("import", "hf")])
def test_an_output_overlapping_the_source_is_refused(capsys, sources, tmp_path, command, source, where):
    # `export RUN RUN --overwrite` once deleted the whole training run: refused before anything is written.
    src = copy_of(sources / source, tmp_path / "box" / source)
    out = {"itself": src, "inside": src / "out", "parent": tmp_path / "box"}[where]
    before = _tree(tmp_path)
    err = refused(capsys, [command, str(src), str(out), "--overwrite"])
    assert "overlaps" in err, err
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("command, source", [("export", "run"), ("import", "hf")])
def test_an_output_linked_to_the_source_is_refused(capsys, sources, tmp_path, command, source):
    src = copy_of(sources / source, tmp_path / source)
    (tmp_path / "link").symlink_to(src)
    err = refused(capsys, [command, str(src), str(tmp_path / "link"), "--overwrite"])
    assert "overlaps" in err and str(src) in err, err
    assert (tmp_path / "link").is_symlink() and _tree(src) == _tree(sources / source)


@pytest.mark.parametrize("filled", [False, True])
def test_export_writes_through_a_symlinked_output_dir(capsys, sources, tmp_path, filled):
    # A link to an empty directory exited 1; with --overwrite the link was left renamed aside.
    target = tmp_path / "storage" / "out"
    target.mkdir(parents=True)
    if filled:
        (target / "old.txt").write_text("old")
    (tmp_path / "out").symlink_to(target)
    main(["export", str(sources / "run"), str(tmp_path / "out"), *(["--overwrite"] if filled else [])])
    assert (tmp_path / "out").is_symlink() and (target / "config.json").is_file()
    assert not (target / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "storage"]
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]
