"""Hybrid layer patterns: one character per layer, `|` between pipeline segments.

`M` Mamba-2 mixer, `*` self-attention, `-` FFN, `E` mixture-of-experts FFN (Nemotron 3; its
sizes are `model.moe`). megatron-core also knows `G D +`, which this pipeline does not build.
`M-M*-|M-M*-` is two pipeline segments of five layers each; with `parallel.pp=2` each stage gets
one segment, with `pp=1` and two segments the single stage runs both as virtual stages
(megatron-core: segments / PP = virtual stages per rank).
"""

from collections import Counter
from dataclasses import dataclass

from pipeline.errors import ConfigError

MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
LAYER_SYMBOLS = (MAMBA, ATTENTION, MLP, MOE)
PIPE = "|"
SYMBOL_NAMES = {MAMBA: "mamba", ATTENTION: "attention", MLP: "mlp", MOE: "moe"}


@dataclass(frozen=True)
class Pattern:
    """A validated pattern split into its pipeline segments."""

    segments: tuple[str, ...]

    @property
    def layers(self) -> str:
        """All layer symbols in order, without separators."""
        return "".join(self.segments)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def counts(self) -> dict[str, int]:
        """Number of layers of each type, keyed by `mamba`, `attention`, `mlp`, `moe`."""
        c = Counter(self.layers)
        return {SYMBOL_NAMES[s]: c.get(s, 0) for s in LAYER_SYMBOLS}

    def __str__(self) -> str:
        return PIPE.join(self.segments)


def parse_pattern(text: str, field: str = "model.pattern") -> Pattern:
    """Parse and validate a pattern string; raise ConfigError naming `field` on bad input."""
    if not text:
        raise ConfigError(f"{field} is empty; give one symbol per layer, e.g. {field}='M-M*-'")
    bad = sorted({c for c in text if c not in LAYER_SYMBOLS and c != PIPE})
    if bad:
        raise ConfigError(
            f"{field} has unknown layer symbol(s) {''.join(bad)!r}; use 'M' (Mamba-2), '*' "
            f"(attention), '-' (FFN), 'E' (mixture of experts) and '|' between pipeline segments"
        )
    segments = tuple(text.split(PIPE))
    if any(not s for s in segments):
        raise ConfigError(f"{field}={text!r} has an empty pipeline segment; remove the extra '|'")
    return Pattern(segments)


@dataclass(frozen=True)
class StageLayers:
    """Which layers one (virtual) pipeline stage builds."""

    symbols: str
    offset: int  # global index of the stage's first layer


def split_stages(pattern: Pattern, pp: int, field: str = "model.pattern") -> list[list[StageLayers]]:
    """Layers of every pipeline rank and virtual stage: result[pp_rank][vp_stage].

    With one segment the layers are divided as evenly as possible in order (earlier ranks get the
    remainder); with several segments they must be a multiple of `pp`, and segment k goes to rank
    k % pp as virtual stage k // pp, as megatron-core does.
    """
    if pp < 1:
        raise ConfigError(f"parallel.pp={pp} must be >= 1")
    if pp == 1:
        # Without pipeline parallelism '|' separators carry no meaning: one stage holds every layer.
        return [[StageLayers(pattern.layers, 0)]]
    segments = list(pattern.segments)
    if len(segments) == 1 and pp > 1:
        layers = segments[0]
        if len(layers) < pp:
            raise ConfigError(
                f"{field} has {len(layers)} layers, fewer than parallel.pp={pp}; lower parallel.pp"
            )
        base, extra = divmod(len(layers), pp)
        sizes = [base + (1 if r < extra else 0) for r in range(pp)]
        segments, start = [], 0
        for size in sizes:
            segments.append(layers[start : start + size])
            start += size
    if len(segments) % pp:
        raise ConfigError(
            f"{field} has {len(segments)} pipeline segments, not divisible by parallel.pp={pp}; "
            f"use a parallel.pp that divides {len(segments)} or change the '|' separators"
        )
    offsets, total = [], 0
    for s in segments:
        offsets.append(total)
        total += len(s)
    vp = len(segments) // pp
    return [
        [StageLayers(segments[v * pp + r], offsets[v * pp + r]) for v in range(vp)]
        for r in range(pp)
    ]


def megatron_pattern(pattern: Pattern, pp: int) -> str:
    """The pattern string handed to megatron-core, with explicit `|` for every stage."""
    stages = split_stages(pattern, pp)
    vp = len(stages[0])
    ordered = [stages[r][v].symbols for v in range(vp) for r in range(pp)]
    return PIPE.join(ordered)
