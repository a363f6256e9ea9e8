"""The `precision` config group: parameter dtype and FP8 settings (applied in `pipeline.model.build`)."""

from dataclasses import dataclass
from typing import Optional

from pipeline.errors import ConfigError

FP8_RECIPES = ("tensorwise", "delayed", "blockwise", "mxfp8")


@dataclass
class PrecisionConfig:
    """Numeric formats. FP8 applies to Transformer Engine GEMMs only (GPU)."""

    name: str = "bf16"
    params_dtype: str = "bf16"
    """Compute/parameter dtype: bf16 or fp32 (the optimizer keeps fp32 master weights)."""
    fp8: Optional[str] = None
    """None, 'hybrid' (E4M3 forward, E5M2 backward) or 'e4m3'."""
    fp8_recipe: str = "tensorwise"
    """tensorwise (current scaling), delayed, blockwise or mxfp8 (Blackwell only)."""
    fp8_amax_history_len: int = 1024
    """Delayed scaling only: amax history window."""
    first_last_layers_bf16: bool = False
    """Keep the first/last layers in BF16 (the Nemotron-H recipe); not with delayed scaling."""
    num_layers_at_start_in_bf16: int = 2
    num_layers_at_end_in_bf16: int = 2

    def __post_init__(self) -> None:
        if self.params_dtype not in ("bf16", "fp32"):
            raise ConfigError(f"precision.params_dtype={self.params_dtype!r}; use bf16 or fp32")
        if self.fp8 not in (None, "hybrid", "e4m3"):
            raise ConfigError(f"precision.fp8={self.fp8!r}; use null, hybrid or e4m3")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ConfigError(
                f"precision.fp8_recipe={self.fp8_recipe!r}; use one of {', '.join(FP8_RECIPES)}"
            )
        if self.fp8 and self.first_last_layers_bf16 and self.fp8_recipe == "delayed":
            raise ConfigError(
                "precision.first_last_layers_bf16=true is not supported with "
                "precision.fp8_recipe=delayed; use fp8_recipe=tensorwise or set "
                "first_last_layers_bf16=false"
            )
