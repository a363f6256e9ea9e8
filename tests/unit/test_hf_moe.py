"""Hugging Face conversion of MoE (`E`) models: a `tiny_moe` checkpoint (sigmoid router with a non-zero
expert bias, top-2 of 8 experts, scaling 2.5, shared expert, padded vocabulary) exported and loaded by
transformers alone computes the pipeline's logits; an MoE directory written by transformers comes back
bit for bit through import and export; what transformers routes differently is refused in one line.

The export of an expert-parallel (EP=2) checkpoint: tests/distributed/test_hf_parallel.py.
"""

import json

import pytest
import torch

from pipeline.checkpoint import CheckpointTensors
from pipeline.config import load_run_config
from pipeline.convert import main
from pipeline.hf.config import hf_config, model_config_from_hf
from pipeline.hf.export import export_checkpoint
from pipeline.hf.import_ import import_hf
from pipeline.hf.mapping import conversions, hf_shapes, megatron_shapes, to_hf, to_megatron
from tests.distributed.worker_hf_checkpoint import (
    MOE_HF_CONFIG,
    MOE_MODEL_OVERRIDES,
    make_hf_model,
    make_tokenizer,
    read_all,
    write_checkpoint,
)
from tests.unit.test_hf_errors import copy_of, edit_json, nothing_written, refused
from tests.unit.test_hf_mapping import megatron_checkpoint_shapes

VOCAB = 1000
TOLERANCE = 1e-4  # as for the dense models (tests/unit/test_hf_export.py)
STEP = "step_0000000"


def load_hf(path, **config):
    """The exported model as transformers loads it; every tensor in the files must find its place."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True, **config)
    # A missing e_score_correction_bias would silently be initialised to zeros.
    assert not any(info.values()), f"transformers loading info: {info}"
    return model.eval()


def max_diff(path, ref, **config) -> float:
    with torch.no_grad():
        logits = load_hf(path, **config)(ref["tokens"]).logits
    return (logits - ref["logits"][..., :VOCAB]).abs().max().item()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_moe")
    write_checkpoint(root / "run", make_tokenizer(root / "tokenizer", VOCAB), [], base=MOE_MODEL_OVERRIDES)
    result = export_checkpoint(root / "run", root / "hf")
    return {"root": root, "hf": root / "hf", "result": result, "reference": torch.load(root / "run" / "reference.pt")}


@pytest.fixture(scope="module")
def model():
    return load_run_config(MOE_MODEL_OVERRIDES).model


def test_logits_match_pipeline_forward(run):
    diff = max_diff(run["hf"], run["reference"])
    assert diff <= TOLERANCE, f"HF and pipeline logits differ by {diff:.3g} (> {TOLERANCE})"


@pytest.mark.parametrize("change", ["no expert bias", "no top-k scaling"])
def test_parity_depends_on_bias_and_scaling(run, change):
    # The check above would catch an export that lost the expert bias or the scaling factor.
    if change == "no top-k scaling":
        diff = max_diff(run["hf"], run["reference"], routed_scaling_factor=1.0)
    else:
        model = load_hf(run["hf"])
        for layer in model.model.layers:
            if layer.block_type == "moe":
                layer.mixer.gate.e_score_correction_bias.zero_()
        with torch.no_grad():
            logits = model(run["reference"]["tokens"]).logits
        diff = (logits - run["reference"]["logits"][..., :VOCAB]).abs().max().item()
    assert diff > 10 * TOLERANCE, f"{change} changed the logits by only {diff:.3g}; the test model does not show it"


def test_config_carries_every_moe_field(run, model):
    config = json.loads((run["hf"] / "config.json").read_text())
    moe = model.moe
    expected = {
        "hybrid_override_pattern": model.pattern,
        "n_routed_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.ffn_hidden_size,
        "moe_shared_expert_intermediate_size": moe.shared_ffn_hidden_size,
        "routed_scaling_factor": moe.scaling_factor,
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "moe_latent_size": None,
    }
    wrong = {k: (config.get(k), v) for k, v in expected.items() if config.get(k) != v}
    assert not wrong, f"config.json (got, expected): {wrong}"


def test_experts_bias_and_router_are_the_checkpoints(run, model):
    ckpt = CheckpointTensors(run["root"] / "run" / "checkpoints" / STEP)
    hf = read_all(run["hf"])
    for i, symbol in enumerate(model.pattern):
        if symbol != "E":
            continue
        prefix, layer = f"decoder.layers.{i}.mlp.", f"backbone.layers.{i}.mixer."
        bias = ckpt.get(prefix + "router.expert_bias")
        assert bias.abs().max() > 0 and torch.equal(hf[layer + "gate.e_score_correction_bias"], bias)
        assert torch.equal(hf[layer + "gate.weight"], ckpt.get(prefix + "router.weight"))
        fc1, fc2 = (ckpt.get(f"{prefix}experts.experts.linear_fc{n}.weight") for n in (1, 2))
        for j in range(model.moe.num_experts):
            assert torch.equal(hf[f"{layer}experts.{j}.up_proj.weight"], fc1[j]), f"layer {i} expert {j} up_proj"
            assert torch.equal(hf[f"{layer}experts.{j}.down_proj.weight"], fc2[j]), f"layer {i} expert {j} down_proj"
        shared = ckpt.get(prefix + "shared_experts.linear_fc1.weight")
        assert torch.equal(hf[layer + "shared_experts.up_proj.weight"], shared)
    assert run["result"].copied_tensors == run["result"].tensors, "an fp32 export copies every tensor"


def test_bf16_export_keeps_the_expert_bias_in_fp32(run, tmp_path):
    # Rounding the bias to bf16 would change which experts are chosen.
    export_checkpoint(run["root"] / "run", tmp_path / "bf16", dtype="bf16")
    fp32, bf16 = read_all(run["hf"]), read_all(tmp_path / "bf16")
    for name, tensor in fp32.items():
        if name.endswith("e_score_correction_bias"):
            assert bf16[name].dtype == torch.float32 and torch.equal(bf16[name], tensor), name
        else:
            assert bf16[name].dtype == torch.bfloat16 and torch.equal(bf16[name], tensor.to(torch.bfloat16)), name
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in bf16.values())


def test_conversions_consume_megatrons_checkpoint_keys(model):
    # The routers' expert bias is a buffer, not a parameter: it must still be read.
    run = load_run_config(MOE_MODEL_OVERRIDES)
    assert megatron_shapes(model) == megatron_checkpoint_shapes(run)


def transformers_shapes(model) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of transformers' own module tree for `model`, per-expert tensors stacked by name."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    config = NemotronHConfig(**{k: v for k, v in hf_config(model, "fp32").items() if k != "architectures"})
    with torch.device("meta"):
        hf = NemotronHForCausalLM(config)
    return {k.replace("model.", "backbone.", 1): tuple(v.shape) for k, v in hf.state_dict().items()}


def stacked(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """`mixer.experts.{j}.up_proj.weight` files -> transformers' merged `mixer.experts.up_proj`."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        head, sep, tail = name.partition(".experts.")
        if sep:
            j, proj, _ = tail.split(".")
            key = f"{head}.experts.{proj}"
            out[key] = (int(j) + 1, *shape) if key not in out else (max(out[key][0], int(j) + 1), *shape)
        else:
            out[name] = shape
    return out


@pytest.mark.parametrize("extra", [[], ["model.moe.latent_size=32", "model.moe.expert_bias=false"]])
def test_hf_names_and_shapes_are_transformers(extra):
    model = load_run_config([*MOE_MODEL_OVERRIDES, *extra]).model
    assert stacked(hf_shapes(model)) == transformers_shapes(model)


@pytest.mark.parametrize("extra", [[], ["model.moe.latent_size=32"], ["model.moe.expert_bias=false"]])
def test_to_megatron_inverts_to_hf(extra):
    model = load_run_config([*MOE_MODEL_OVERRIDES, *extra]).model
    gen = torch.Generator().manual_seed(0)
    megatron = {k: torch.randn(s, generator=gen) for k, s in megatron_shapes(model).items()}
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        megatron[key][model.vocab_size :] = 0
    hf = dict(to_hf(model, megatron.__getitem__))
    if not model.moe.expert_bias:
        assert all(torch.all(t == 0) for n, t in hf.items() if n.endswith("e_score_correction_bias"))
    back = dict(to_megatron(model, hf.__getitem__))
    assert back.keys() == megatron.keys() and all(torch.equal(back[k], megatron[k]) for k in megatron)
    # Byte-range copies (exports without a dtype change) assemble what to_hf computes.
    for conversion in conversions(model):
        if not conversion.megatron:
            continue
        flat = [megatron[key].reshape(-1) for key, _ in conversion.megatron]
        for (name, shape), pieces in zip(conversion.hf, conversion.pieces(), strict=True):
            assembled = torch.cat([flat[i][first : first + count] for i, first, count in pieces])
            assert torch.equal(assembled.view(shape), hf[name]), f"pieces of {name} disagree with to_hf"


def test_nemotron3_nano_exports_the_published_config():
    # nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 config.json (issue 24's figures).
    config = hf_config(load_run_config(["model=nemotron3_nano_30b_a3b"]).model, "bf16")
    published = {
        "n_routed_experts": 128,
        "num_experts_per_tok": 6,
        "moe_intermediate_size": 1856,
        "moe_shared_expert_intermediate_size": 3712,
        "routed_scaling_factor": 2.5,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "hidden_size": 2688,
        "num_hidden_layers": 52,
    }
    assert {k: config[k] for k in published} == published


def test_model_config_survives_hf_config(model):
    back = model_config_from_hf(hf_config(model, "fp32"), model.name)
    moe = model.moe
    shape = ("num_experts", "top_k", "ffn_hidden_size", "shared_ffn_hidden_size", "score_function", "expert_bias",
             "scaling_factor", "latent_size")
    assert {f: getattr(back.moe, f) for f in shape} == {f: getattr(moe, f) for f in shape}
    assert back.pattern == model.pattern


# --- import: a directory written by transformers itself ---


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_moe_import")
    make_hf_model(root / "source", **MOE_HF_CONFIG)
    result = import_hf(root / "source", root / "imported", name="tiny_moe_hf")
    export_checkpoint(root / "imported", root / "exported")
    return {"root": root, "result": result}


def test_import_round_trip_is_bit_for_bit(imported):
    source, exported = read_all(imported["root"] / "source"), read_all(imported["root"] / "exported")
    assert source.keys() == exported.keys(), f"names differ: {sorted(source.keys() ^ exported.keys())}"
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype, f"{name}: {exported[name].dtype} != {tensor.dtype}"
        assert torch.equal(exported[name], tensor), f"{name} changed in the round trip"


def test_import_config_and_model_option(imported):
    from transformers import AutoConfig

    root = imported["root"]
    source = AutoConfig.from_pretrained(root / "source").to_dict()
    exported = AutoConfig.from_pretrained(root / "exported").to_dict()
    changed = {k for k in source if source[k] != exported.get(k)}
    assert changed == {"_name_or_path", "time_step_min"}, sorted(changed)
    run = load_run_config([f"hydra.searchpath=[file://{root / 'imported'}]", "model=tiny_moe_hf"])
    assert run.model == imported["result"].model
    moe = run.model.moe
    assert (moe.num_experts, moe.top_k, moe.scaling_factor, moe.score_function, moe.expert_bias) == (
        8, 2, 2.5, "sigmoid", True)


def test_bf16_import_of_fp32_router_weights_says_it_rounds_them(imported, tmp_path):
    # transformers keeps gate.weight in fp32 (_keep_in_fp32_modules_strict): its own saves of a bf16
    # model store it so; megatron-core's router weight has the model's dtype.
    from safetensors.torch import load_file, save_file

    source = copy_of(imported["root"] / "source", tmp_path / "hf")
    tensors = load_file(source / "model.safetensors")
    gates = [n for n in tensors if n.endswith("mixer.gate.weight")]
    for name in gates:
        tensors[name] = tensors[name].float() + 1e-4
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    result = import_hf(source, tmp_path / "imported")
    assert any(f"{len(gates)} router weight(s)" in n and "precision=fp32" in n for n in result.notes), result.notes
    ckpt = CheckpointTensors(result.checkpoint)
    for name in gates:
        key = name.replace("backbone.", "decoder.").replace("mixer.gate", "mlp.router")
        assert torch.equal(ckpt.get(key), tensors[name].to(torch.bfloat16)), key


# --- refusals: exit 2, one `error:` line naming the field, nothing written ---


def with_moe(run_root, tmp_path, **moe):
    """A copy of the exported run whose meta.json records other model.moe options."""

    def edit(run_dir):
        meta = run_dir / "checkpoints" / STEP / "meta.json"
        content = json.loads(meta.read_text())
        content["model"]["moe"].update(moe)
        meta.write_text(json.dumps(content))

    return copy_of(run_root, tmp_path / "run", edit)


EXPORT_REFUSALS = {
    "softmax router": ({"score_function": "softmax", "expert_bias": False}, "model.moe.score_function='softmax'"),
    "no shared expert": ({"shared_ffn_hidden_size": 0}, "model.moe.shared_ffn_hidden_size=0"),
    "group ranking": ({"num_groups": 4, "topk_groups": 2}, "model.moe.num_groups=4"),
}


@pytest.mark.parametrize("case", sorted(EXPORT_REFUSALS))
def test_export_refuses_routing_transformers_computes_differently(capsys, run, tmp_path, case):
    moe, expected = EXPORT_REFUSALS[case]
    source = with_moe(run["root"] / "run", tmp_path, **moe)
    err = refused(capsys, ["export", str(source), str(tmp_path / "out")])
    assert expected in err, f"{case}: {expected!r} missing from {err!r}"
    nothing_written(tmp_path, "out")


def test_export_refuses_latent_moe_without_transformers_support(capsys, run, tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.hf.config.transformers_has_latent_moe", lambda: False)
    source = with_moe(run["root"] / "run", tmp_path, latent_size=32)
    err = refused(capsys, ["export", str(source), str(tmp_path / "out")])
    assert "model.moe.latent_size=32" in err and "upgrade transformers" in err, err
    nothing_written(tmp_path, "out")


def test_export_notes_token_dropping(capsys, run, tmp_path):
    main(["export", str(with_moe(run["root"] / "run", tmp_path, capacity_factor=1.5)), str(tmp_path / "out")])
    assert "note: model.moe.capacity_factor=1.5" in capsys.readouterr().out


IMPORT_REFUSALS = {
    "unnormalised top-k": ({"norm_topk_prob": False}, "norm_topk_prob=False"),
    "group ranking": ({"n_group": 4, "topk_group": 2}, "n_group=4"),
}


@pytest.mark.parametrize("case", sorted(IMPORT_REFUSALS))
def test_import_refuses_routing_megatron_computes_differently(capsys, imported, tmp_path, case):
    changes, expected = IMPORT_REFUSALS[case]
    hf = copy_of(imported["root"] / "source", tmp_path / "hf", lambda d: edit_json(d / "config.json", **changes))
    err = refused(capsys, ["import", str(hf), str(tmp_path / "out")])
    assert expected in err, f"{case}: {expected!r} missing from {err!r}"
    nothing_written(tmp_path, "out")


def test_import_overrides_may_follow_the_options():
    # The usage line puts them last: `import HF_DIR OUT_DIR [--name NAME] [--overwrite] [parallel.ep=2 ...]`.
    from pipeline.convert import parse_args

    args = parse_args(["import", "hf", "out", "--name", "x", "parallel.ep=2", "--overwrite", "precision=fp32"])
    assert (args.name, args.overwrite, args.overrides) == ("x", True, ["parallel.ep=2", "precision=fp32"])
