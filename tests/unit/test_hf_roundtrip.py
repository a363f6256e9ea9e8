"""HF -> pipeline -> HF: a NemotronH directory written by transformers itself comes back bit for bit.

The import at TP=2 x PP=2 (torchrun) is in tests/distributed/test_hf_parallel.py.
"""

import json

import pytest
import torch

from pipeline.config import load_run_config
from pipeline.hf.config import TIME_STEP_MIN
from pipeline.hf.export import export_checkpoint
from pipeline.hf.import_ import import_hf
from tests.distributed.worker_hf_checkpoint import make_hf_model, read_all

# Fields that may differ after a round trip, and why: where the file was loaded from; the dt clamp,
# which exports always switch off because the pipeline never clamps (pipeline/hf/config.py).
EXPECTED_CONFIG_CHANGES = {"_name_or_path", "time_step_min"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_roundtrip")
    make_hf_model(root / "source")
    result = import_hf(root / "source", root / "imported", name="tiny_hf")
    export_checkpoint(root / "imported", root / "exported")
    return {"root": root, "result": result}


def test_every_tensor_comes_back_bit_for_bit(dirs):
    source, exported = read_all(dirs["root"] / "source"), read_all(dirs["root"] / "exported")
    assert source.keys() == exported.keys(), f"names differ: {sorted(source.keys() ^ exported.keys())}"
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype, f"{name}: {exported[name].dtype} != {tensor.dtype}"
        assert torch.equal(exported[name], tensor), f"{name} changed in the round trip"


def test_config_comes_back_equivalent(dirs):
    from transformers import AutoConfig

    source = AutoConfig.from_pretrained(dirs["root"] / "source").to_dict()
    exported = AutoConfig.from_pretrained(dirs["root"] / "exported").to_dict()
    changed = {k for k in source if source[k] != exported.get(k)}
    assert changed == EXPECTED_CONFIG_CHANGES, f"unexpected config changes: {sorted(changed - EXPECTED_CONFIG_CHANGES)}"
    assert exported["time_step_min"] == TIME_STEP_MIN
    assert set(exported) - set(source) == {"attention_head_dim"}, "only the old readers' head-dim alias may be added"
    assert exported["attention_head_dim"] == source["head_dim"]


def test_import_reports_the_dt_clamp_it_cannot_keep(dirs):
    notes = dirs["result"].notes
    assert any("time_step_min=0.001" in note for note in notes), notes


def test_model_yaml_is_a_hydra_model_option(dirs):
    imported = dirs["root"] / "imported"
    assert dirs["result"].model_yaml == imported / "model" / "tiny_hf.yaml"
    run = load_run_config([f"hydra.searchpath=[file://{imported}]", "model=tiny_hf"])
    assert run.model == dirs["result"].model


def test_checkpoint_is_weights_only_at_step_zero_with_its_tokenizer(dirs):
    from pipeline.checkpoint import read_meta, resolve_checkpoint

    imported = dirs["root"] / "imported"
    ckpt = resolve_checkpoint(imported)
    meta = read_meta(ckpt)
    assert ckpt.name == "step_0000000" and meta.step == 0 and meta.weights_only is True
    assert meta.tokenizer == str(imported / "tokenizer")
    source_tokenizer = json.loads((dirs["root"] / "source" / "tokenizer.json").read_text())
    assert json.loads((imported / "tokenizer" / "tokenizer.json").read_text()) == source_tokenizer
