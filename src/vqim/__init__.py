"""vqim: vector-quantized image modeling (ViT-VQGAN / VQGAN tokenizers, VIM priors)."""

__version__ = "0.1.0"

from vqim.config import TokenizerConfig, get_tokenizer_config, tokenizer_presets  # noqa: E402
from vqim.tokenizer import Tokenizer, TokenizerOutput  # noqa: E402

__all__ = ["Tokenizer", "TokenizerOutput", "TokenizerConfig", "get_tokenizer_config", "tokenizer_presets"]
