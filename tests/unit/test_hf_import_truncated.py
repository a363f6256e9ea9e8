"""A truncated safetensors file on `convert.py import`: one line naming the file, nothing written."""

import pytest

from pipeline.convert import main
from tests.distributed.worker_hf_checkpoint import make_hf_model


@pytest.mark.parametrize("keep", [0.5, 0.999], ids=["half", "last-bytes-missing"])
def test_truncated_safetensors_is_named_and_nothing_is_written(capsys, tmp_path, keep):
    hf = make_hf_model(tmp_path / "hf")
    weights = hf / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    capsys.readouterr()  # transformers' progress bars while making the model
    with pytest.raises(SystemExit) as info:
        main(["import", str(hf), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert str(weights) in err and "truncated" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"], "something was written"
