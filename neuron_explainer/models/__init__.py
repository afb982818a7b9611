"""Hooked transformer models, their loaders and tokenizers."""

from neuron_explainer.models.architectures import ARCHITECTURES, UnsupportedArchitectureError
from neuron_explainer.models.config import ModelConfig
from neuron_explainer.models.generation import KVCache, generate
from neuron_explainer.models.hooks import BLOCK_HOOKS, GLOBAL_HOOKS, HookPoint
from neuron_explainer.models.loading import export_hf, load_model, load_model_reporting
from neuron_explainer.models.registry import DEFAULT_MODEL, ModelNotFoundError
from neuron_explainer.models.tokenizer import Tokenizer
from neuron_explainer.models.tokenizer_files import TokenizerError
from neuron_explainer.models.transformer import HookedTransformer, pad_right

__all__ = [
    "ARCHITECTURES",
    "BLOCK_HOOKS",
    "DEFAULT_MODEL",
    "GLOBAL_HOOKS",
    "HookPoint",
    "HookedTransformer",
    "KVCache",
    "ModelConfig",
    "ModelNotFoundError",
    "Tokenizer",
    "TokenizerError",
    "UnsupportedArchitectureError",
    "export_hf",
    "generate",
    "load_model",
    "load_model_reporting",
    "pad_right",
]
