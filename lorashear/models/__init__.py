"""Models lorashear works with out of the box: SmolLM2-135M-Instruct, prepared offline."""

from lorashear.models.default import (
    DEFAULT_MODEL_NAME,
    cache_root,
    default_model_dir,
    find_default_gguf,
    is_complete,
    prepare_default_model,
)

__all__ = ["DEFAULT_MODEL_NAME", "cache_root", "default_model_dir", "find_default_gguf",
           "is_complete", "prepare_default_model"]
