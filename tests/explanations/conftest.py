"""The tiny store of the dataset tests (a 2-layer random Llama, 1,024 tokens of prose), reused."""

from tests.datasets.conftest import (  # noqa: F401
    prose_dir,
    tiny_model,
    tiny_model_dir,
    tiny_store,
)
