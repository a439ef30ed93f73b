"""vqim: vector-quantized image modeling (ViT-VQGAN / VQGAN tokenizers, VIM priors)."""

__version__ = "0.1.0"

from vqim.config import (  # noqa: E402
    PriorConfig,
    TokenizerConfig,
    get_prior_config,
    get_tokenizer_config,
    prior_presets,
    tokenizer_presets,
)
from vqim.errors import InputError  # noqa: E402
from vqim.prior import Prior, PriorOutput  # noqa: E402
from vqim.sampling import generate, generate_images, generate_recompute, sample_logits  # noqa: E402
from vqim.tokenizer import Tokenizer, TokenizerOutput  # noqa: E402

__all__ = [
    "InputError",
    "Tokenizer",
    "TokenizerOutput",
    "TokenizerConfig",
    "get_tokenizer_config",
    "tokenizer_presets",
    "Prior",
    "PriorOutput",
    "PriorConfig",
    "get_prior_config",
    "prior_presets",
    "generate",
    "generate_recompute",
    "generate_images",
    "sample_logits",
]
