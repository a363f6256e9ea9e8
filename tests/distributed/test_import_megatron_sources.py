"""`convert.py import-megatron` beyond the plain Megatron-LM case: NeMo-2-shaped and Bridge-shaped
checkpoints (the genuine Megatron-LM fixture's weights with those tools' config files), --weights-only,
and everything it refuses: one `error:` line naming the field, exit status 2, nothing written; a
crafted pickle refused without being run."""

import json
import pickle
import shutil

import pytest
import torch
import yaml

from pipeline.checkpoint import CheckpointMeta, CheckpointTensors
from pipeline.convert import main
from tests.distributed.training import REPO
from tests.distributed.worker_megatron_lm import NEMO_DIR

ITER = "iter_0000002"
MODEL_CONFIG = {  # the fixture's model as megatron TransformerConfig fields (NeMo 2 / Bridge configs)
    "hybrid_layer_pattern": "M-M*-M-", "num_layers": 7, "hidden_size": 128, "ffn_hidden_size": 512,
    "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 32, "mamba_num_heads": 16,
    "mamba_head_dim": 16, "mamba_num_groups": 2, "mamba_state_dim": 16, "seq_length": 64,
    "normalization": "RMSNorm", "add_bias_linear": False, "gated_linear_unit": False,
    "position_embedding_type": "none", "share_embeddings_and_output_weights": False,
    "activation_func": {"_target_": "megatron.core.activations.squared_relu", "_call_": False},
    "make_vocab_size_divisible_by": 128, "bf16": False,
}


@pytest.fixture(scope="module")
def fixture(tmp_path_factory, megatron_lm_tp1):
    """The genuine Megatron-LM save dir (a copy of the session's), its weights NeMo-2-style, and a
    Bridge-shaped copy."""
    root = tmp_path_factory.mktemp("sources")
    shutil.copytree(megatron_lm_tp1, root, dirs_exist_ok=True)
    nemo = root / NEMO_DIR
    (nemo / "context").mkdir()
    (nemo / "context" / "model.yaml").write_text(yaml.safe_dump(
        {"_target_": "nemo.collections.llm.gpt.model.ssm.MambaModel",
         "config": {"_target_": "nemo.collections.llm.gpt.model.ssm.SSMConfig", **MODEL_CONFIG}}))
    (nemo / "context" / "io.json").write_text("{}")
    bridge = root / "bridge"
    shutil.copytree(root / "ckpt", bridge)
    write_run_config(bridge / ITER, MODEL_CONFIG)
    shutil.copytree(REPO / "data" / "build" / "tokenizer", bridge / ITER / "tokenizer")  # the test corpus's
    return root


def write_run_config(iter_dir, model: dict) -> None:
    (iter_dir / "run_config.yaml").write_text(yaml.safe_dump(
        {"model": {"_target_": "megatron.bridge.models.mamba.MambaModelProvider", **model},
         "train": {"global_batch_size": 4}}))


def cli(*args) -> None:
    main(["import-megatron", *map(str, args)])


def refused(capsys, *args) -> str:
    """The one error line of an import that must be refused with status 2."""
    with pytest.raises(SystemExit) as exit_:
        cli(*args)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert exit_.value.code == 2 and len(errors) == 1, errors
    return errors[0]


def test_nemo2_and_bridge_shapes_import_the_same_weights(fixture, tmp_path, capsys):
    cli(fixture / "ckpt", tmp_path / "megatron", "--weights-only")
    cli(fixture / NEMO_DIR, tmp_path / "nemo")
    out = capsys.readouterr().out
    assert "has no optimizer state: imported the weights only" in out, out
    cli(fixture / "bridge", tmp_path / "bridge")
    assert (tmp_path / "bridge" / "tokenizer" / "tokenizer.json").is_file()
    reference = CheckpointTensors(tmp_path / "megatron" / "checkpoints" / f"step_{2:07d}")
    assert reference.meta.weights_only and reference.meta.imported_from["kind"] == "megatron-lm"
    for kind, resumable in (("nemo", False), ("bridge", True)):
        imported = CheckpointTensors(tmp_path / kind / "checkpoints" / f"step_{2:07d}")
        assert imported.meta.imported_from["kind"] == {"nemo": "nemo2", "bridge": "bridge"}[kind]
        assert imported.meta.weights_only is not resumable and imported.meta.step == 2
        assert imported.meta.tokenizer == (str(tmp_path / "bridge" / "tokenizer") if resumable else None)
        for key in reference.shapes:
            assert torch.equal(imported.get(key), reference.get(key)), (kind, key)


def test_source_kind_can_be_named(fixture, tmp_path, capsys):
    cli(fixture / "bridge" / ITER, tmp_path / "as_megatron", "--source-kind", "megatron-lm", "--name", "m")
    assert CheckpointMeta.read(tmp_path / "as_megatron" / "checkpoints" / f"step_{2:07d}").imported_from["kind"] \
        == "megatron-lm"
    error = refused(capsys, fixture / "ckpt", tmp_path / "nemo_kind", "--source-kind", "nemo2")
    assert "no weights/" in error and not (tmp_path / "nemo_kind").exists()


MOE = {"hybrid_layer_pattern": "MEM*EME", "num_moe_experts": 4}


@pytest.mark.parametrize("change, shown", [
    ({"position_embedding_type": "rope"}, "position_embedding_type"),
    ({"add_bias_linear": True}, "add_bias_linear"),
    ({"gated_linear_unit": True}, "gated_linear_unit"),
    ({"activation_func": {"_target_": "torch.nn.functional.gelu", "_call_": False}}, "activation"),
    ({"normalization": "LayerNorm"}, "normalization"),
    ({"share_embeddings_and_output_weights": True}, "tied_embeddings"),
    ({"mtp_num_layers": 1}, "mtp_num_layers"),
    ({"hybrid_layer_pattern": "M-M*-MG"}, "hybrid_layer_pattern"),
    ({"hybrid_layer_pattern": "M-M*-M-/M-"}, "hybrid_layer_pattern"),
    ({"qk_layernorm": True}, "qk_layernorm"),
    ({"fp16": True}, "fp16"),
    ({**MOE, "moe_shared_expert_gate": True}, "moe_shared_expert_gate"),
    ({**MOE, "moe_router_pre_softmax": True}, "moe_router_pre_softmax"),
    ({"hybrid_layer_pattern": "MEM*EME"}, "num_experts"),
])
def test_config_it_cannot_represent_is_refused(fixture, tmp_path, capsys, change, shown):
    bridge = tmp_path / "bridge"
    shutil.copytree(fixture / "bridge", bridge)
    write_run_config(bridge / ITER, {**MODEL_CONFIG, **change})
    error = refused(capsys, bridge, tmp_path / "out")
    assert shown in error, error
    assert not (tmp_path / "out").exists()


class _Payload:
    """Unpickling this runs `touch MARKER`: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def megatron_copy(fixture, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(fixture / "ckpt", copy)
    return copy


def common_state(ckpt_dir):
    from pipeline.migrate.source import read_common_state

    return read_common_state(ckpt_dir)


@pytest.mark.parametrize("change, field", [
    ("rope", "position_embedding_type"),
    ("swiglu", "gated_linear_unit"),
    ("biases", "add_bias_linear"),
    ("tied", "tied_embeddings"),
    ("mp_rank", "mp_rank_00"),
    ("zarr", "zarr"),
    ("fsdp_dtensor", "fsdp_dtensor"),
    ("extra_tensor", "decoder.layers.1.mlp.linear_fc1.bias"),
    ("fp8_tensor", "quantized"),
    ("unsplit_in_proj", "decoder.layers.0.mixer.in_proj.weight"),
    ("modelopt", "modelopt_state"),
])
def test_megatron_lm_checkpoint_it_cannot_represent_is_refused(fixture, tmp_path, capsys, change, field):
    ckpt = megatron_copy(fixture, tmp_path)
    iter_dir = ckpt / ITER
    if change in ("rope", "swiglu", "biases", "tied"):
        # A Megatron-LM <= core 0.18 stores the common state as common.pt, read in preference.
        state = common_state(iter_dir)
        args = state["args"]
        args.position_embedding_type = "rope" if change == "rope" else args.position_embedding_type
        args.swiglu = change == "swiglu"
        args.add_bias_linear = change == "biases"
        args.untie_embeddings_and_output_weights = change != "tied"
        torch.save(state, iter_dir / "common.pt")
    elif change == "mp_rank":
        (iter_dir / "mp_rank_00").mkdir()
    elif change == "zarr":
        (iter_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1}))
    elif change == "fsdp_dtensor":
        (iter_dir / "metadata.json").unlink()
    elif change == "modelopt":
        (iter_dir / "modelopt_state").mkdir()
    else:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        metadata = FileSystemReader(str(iter_dir)).read_metadata()
        norm = metadata.state_dict_metadata["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"]
        assert isinstance(norm, TensorStorageMetadata)
        if change == "fp8_tensor":
            norm.properties.dtype = torch.float8_e4m3fn
        elif change == "unsplit_in_proj":
            metadata.state_dict_metadata[field] = metadata.state_dict_metadata[field + ".z"]
        else:
            metadata.state_dict_metadata[field] = norm
        with open(iter_dir / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
    error = refused(capsys, ckpt, tmp_path / "out")
    assert field in error, error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", [".metadata", "common.pt"])
def test_crafted_pickle_is_refused_not_run(fixture, tmp_path, capsys, where):
    ckpt = megatron_copy(fixture, tmp_path)
    marker = tmp_path / "ran"
    if where == ".metadata":
        with open(ckpt / ITER / where, "wb") as f:
            pickle.dump(_Payload(marker), f)
    else:  # a Megatron-LM <= core 0.18 common.pt, as torch.save writes it
        torch.save({"args": _Payload(marker)}, ckpt / ITER / where)
    error = refused(capsys, ckpt, tmp_path / "out")
    assert "os.system" in error or "posix.system" in error, error
    assert not marker.exists() and not (tmp_path / "out").exists()


def rename_in_metadata(iter_dir, renames: dict[str, str]) -> None:
    """Rename tensors in a torch_dist `.metadata` (their entries and where their bytes are), as a writer
    with other module names would have stored them."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex

    metadata = FileSystemReader(str(iter_dir)).read_metadata()

    def renamed(key: str) -> str:
        for old, new in renames.items():
            key = key.replace(old, new)
        return key

    metadata.state_dict_metadata = {renamed(k): v for k, v in metadata.state_dict_metadata.items()}
    metadata.storage_data = {MetadataIndex(renamed(i.fqn), i.offset, i.index): v
                             for i, v in metadata.storage_data.items()}
    with open(iter_dir / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def test_other_norm_names_are_mapped(fixture, tmp_path, capsys):
    """ModelOpt/local-spec names of the pre-norms (`norm.weight`, `input_layernorm.weight`,
    `pre_mlp_layernorm.weight`), the model's and the optimizer's, load into the pipeline's."""
    ckpt = megatron_copy(fixture, tmp_path)
    rename_in_metadata(ckpt / ITER, {"layers.0.mixer.in_proj.layer_norm_weight": "layers.0.norm.weight",
                                     "layers.3.self_attention.linear_qkv.layer_norm_weight":
                                         "layers.3.input_layernorm.weight",
                                     "layers.1.mlp.linear_fc1.layer_norm_weight": "layers.1.pre_mlp_layernorm.weight"})
    cli(fixture / "ckpt", tmp_path / "plain")
    cli(ckpt, tmp_path / "renamed")
    plain = CheckpointTensors(tmp_path / "plain" / "checkpoints" / f"step_{2:07d}")
    renamed = CheckpointTensors(tmp_path / "renamed" / "checkpoints" / f"step_{2:07d}")
    assert not renamed.meta.weights_only
    for key in ("decoder.layers.0.mixer.in_proj.layer_norm_weight", "decoder.layers.1.mlp.linear_fc1.layer_norm_weight",
                "optimizer.state.exp_avg.decoder.layers.3.self_attention.linear_qkv.layer_norm_weight"):
        assert torch.equal(renamed.get(key), plain.get(key)), key


def older_megatron_args(fixture, tmp_path, **changes):
    """A copy of the Megatron-LM fixture whose stored args look like an older Megatron-LM's: attributes
    set (a value) or absent (None), written as core <= 0.18's common.pt."""
    ckpt = megatron_copy(fixture, tmp_path)
    state = common_state(ckpt / ITER)
    for name, value in changes.items():
        if value is None:
            delattr(state["args"], name)
        else:
            setattr(state["args"], name, value)
    torch.save(state, ckpt / ITER / "common.pt")
    return ckpt


@pytest.mark.parametrize("changes", [
    {"hybrid_layer_pattern": None, "hybrid_override_pattern": "M-M*-M-"},  # before core 0.17
    {"hybrid_layer_pattern": None, "hybrid_override_pattern": None, "hybrid_attention_ratio": 0.14,
     "hybrid_mlp_ratio": 0.43},  # before hybrid_override_pattern
], ids=["override_pattern", "ratios"])
def test_older_pattern_arguments(fixture, tmp_path, capsys, changes):
    cli(older_megatron_args(fixture, tmp_path, **changes), tmp_path / "out", "--weights-only")
    assert CheckpointMeta.read(tmp_path / "out" / "checkpoints" / f"step_{2:07d}").model["pattern"] == "M-M*-M-"


def test_an_absent_flag_means_megatron_s_default(fixture, tmp_path, capsys):
    # Megatron-LM's default position embedding is learned_absolute: an args without the attribute had it.
    error = refused(capsys, older_megatron_args(fixture, tmp_path, position_embedding_type=None), tmp_path / "out")
    assert "position_embedding_type='learned_absolute'" in error, error
