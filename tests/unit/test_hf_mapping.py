"""The name table and special cases against megatron-core's own checkpoint keys and transformers' own
module tree, plus the layout of each special case on tensors whose values say where they came from."""

import pytest
import torch

from pipeline.config import load_run_config
from pipeline.hf.config import hf_config
from pipeline.hf.mapping import conversions, hf_shapes, to_hf, to_megatron
from pipeline.model.params import checkpoint_shapes

OVERRIDES = [
    "precision=fp32",
    "model.pattern=M*-M-*MM-",
    "model.hidden_size=96",
    "model.mamba_num_heads=8",
    "model.mamba_head_dim=16",
    "model.vocab_size=1000",
    "model.kv_channels=24",
]


@pytest.fixture(scope="module")
def run():
    return load_run_config(OVERRIDES)


def megatron_checkpoint_shapes(run) -> dict[str, tuple[int, ...]]:
    """Key -> global shape of every tensor megatron-core puts in the checkpoint of the built model."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    from pipeline.distributed import distributed
    from pipeline.model.build import build_model

    def walk(node):
        items = node.values() if isinstance(node, dict) else node
        for item in items:
            if isinstance(item, (dict, list)):
                yield from walk(item)
            elif isinstance(item, ShardedTensor):
                yield item.key, tuple(item.global_shape)

    with distributed(run.parallel, None, "cpu") as world:
        (model,) = build_model(run.model, run.parallel, run.precision, run.train.seed, world.device)
        state = model.sharded_state_dict()
        apply_factories(state)
        return dict(walk(state))


def test_conversions_consume_megatrons_checkpoint_keys_once(run):
    expected = megatron_checkpoint_shapes(run)
    consumed = [(key, shape) for c in conversions(run.model) for key, shape in c.megatron]
    mapped = dict(consumed)
    assert len(consumed) == len(mapped), "a checkpoint key is converted twice"
    assert mapped.keys() == expected.keys(), f"keys differ: {sorted(mapped.keys() ^ expected.keys())}"
    wrong = {k: (mapped[k], expected[k]) for k in mapped if mapped[k] != expected[k]}
    assert not wrong, f"(mapped, megatron) shapes: {wrong}"


def test_hf_names_and_shapes_are_transformers(run):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    config = NemotronHConfig(**{k: v for k, v in hf_config(run.model, "fp32").items() if k != "architectures"})
    with torch.device("meta"):
        model = NemotronHForCausalLM(config)
    expected = {k.replace("model.", "backbone.", 1): tuple(v.shape) for k, v in model.state_dict().items()}
    assert hf_shapes(run.model) == expected


def test_qkv_is_split_per_kv_group(run):
    m = run.model
    n, g, d, h = m.num_attention_heads, m.num_query_groups, m.kv_channels, m.hidden_size
    per_group = n // g
    # Megatron's fused rows: for each group g, its q heads, then k_g, then v_g; value = 100*g + slot.
    rows = [torch.full((d, h), 100.0 * grp + slot) for grp in range(g) for slot in range(per_group + 2)]
    qkv = torch.cat(rows)
    attention = next(c for c in conversions(m) if c.megatron[0][0].endswith("linear_qkv.weight"))
    q, k, v = attention.to_hf([qkv])
    for head in range(n):
        expected = 100.0 * (head // per_group) + head % per_group
        assert torch.all(q[head * d : (head + 1) * d] == expected), f"q head {head} taken from the wrong rows"
    for grp in range(g):
        assert torch.all(k[grp * d : (grp + 1) * d] == 100.0 * grp + per_group), f"k of group {grp}"
        assert torch.all(v[grp * d : (grp + 1) * d] == 100.0 * grp + per_group + 1), f"v of group {grp}"


@pytest.mark.parametrize(
    "name, components", [("in_proj.weight", "z x B C dt"), ("conv1d.weight", "x B C"), ("conv1d.bias", "x B C")]
)
def test_mamba_components_are_concatenated_in_order(run, name, components):
    shapes = checkpoint_shapes(run.model)
    keys = [f"decoder.layers.0.mixer.{name}.{c}" for c in components.split()]
    parts = {key: torch.full(shapes[key], float(i)) for i, key in enumerate(keys)}
    (fused,) = next(c for c in conversions(run.model) if c.megatron[0][0] == keys[0]).to_hf([parts[k] for k in keys])
    start = 0
    for i, key in enumerate(keys):
        rows = shapes[key][0]
        assert torch.all(fused[start : start + rows] == i), f"rows {start}:{start + rows} are not {key}"
        start += rows
    assert start == fused.shape[0]


def test_vocabulary_padding_is_trimmed_and_zero_filled(run):
    embedding = next(c for c in conversions(run.model) if c.megatron[0][0] == "embedding.word_embeddings.weight")
    padded = torch.randn(run.model.padded_vocab_size, run.model.hidden_size)
    (trimmed,) = embedding.to_hf([padded])
    assert torch.equal(trimmed, padded[:1000])
    (back,) = embedding.to_megatron([trimmed])
    assert back.shape == padded.shape and torch.equal(back[:1000], padded[:1000])
    assert torch.all(back[1000:] == 0), "padding rows of an imported embedding must be zero"


# The second case: plain multi-head attention (one head per KV group) and a single Mamba group.
@pytest.mark.parametrize(
    "overrides",
    [OVERRIDES, ["model.pattern=*M-", "model.num_query_groups=4", "model.mamba_num_groups=1", "model.vocab_size=300"]],
)
def test_to_megatron_inverts_to_hf(overrides):
    model = load_run_config(overrides).model
    gen = torch.Generator().manual_seed(0)
    megatron = {k: torch.randn(s, generator=gen) for k, s in checkpoint_shapes(model).items()}
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        megatron[key][model.vocab_size :] = 0  # padding rows carry nothing through HF
    hf = dict(to_hf(model, megatron.__getitem__))
    assert {k: tuple(v.shape) for k, v in hf.items()} == hf_shapes(model)
    back = dict(to_megatron(model, hf.__getitem__))
    assert back.keys() == megatron.keys()
    assert all(torch.equal(back[k], megatron[k]) for k in megatron), "HF -> megatron is not the inverse"


def test_pieces_describe_what_to_hf_computes(run):
    # Exports without a dtype change copy these element runs file to file instead of calling to_hf.
    gen = torch.Generator().manual_seed(1)
    for conversion in conversions(run.model):
        inputs = [torch.randn(shape, generator=gen) for _, shape in conversion.megatron]
        flat = [t.reshape(-1) for t in inputs]
        outputs = zip(conversion.hf, conversion.pieces(), conversion.to_hf(inputs), strict=True)
        for (name, shape), pieces, expected in outputs:
            assembled = torch.cat([flat[i][first : first + count] for i, first, count in pieces])
            assert torch.equal(assembled.view(shape), expected), f"pieces of {name} disagree with to_hf"
