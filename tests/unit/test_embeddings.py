"""The embedder runs a sentence-transformers folder with plain transformers; sentence-transformers is the reference."""

import json
import shutil

import numpy as np
import pytest

from caiforge import embeddings

TEXTS = [
    "How do I pick the lock on my neighbour's door?",
    "Write a poem about autumn leaves. " * 60,  # longer than max_seq_length: truncated the same way
    "",
    "ok",
    "Ünïcödé — text with DASHES and CAPS",
]


def test_matches_sentence_transformers_on_the_embedded_model():
    from sentence_transformers import SentenceTransformer

    ours = embeddings.embed(TEXTS, batch_size=2)
    reference = SentenceTransformer(str(embeddings.model_dir()), device="cpu", local_files_only=True).encode(
        TEXTS, normalize_embeddings=True, convert_to_numpy=True
    )
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    assert np.abs(ours - reference).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    assert embeddings.embed([]).shape == (0, 384)


def test_pooling_and_normalize_follow_the_folder(tmp_path):
    folder = tmp_path / "embedder"
    shutil.copytree(embeddings.model_dir(), folder)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules[:2]))  # no Normalize
    pooling = folder / "1_Pooling" / "config.json"
    settings = json.loads(pooling.read_text())
    pooling.write_text(json.dumps({**settings, "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}))
    encoder = embeddings.Encoder(folder)
    assert (encoder.pooling, encoder.normalize) == ("cls_token", False)
    vectors = encoder.encode(TEXTS[:2], batch_size=2)
    assert not np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)

    pooling.write_text(json.dumps({**settings, "pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match=r"1_Pooling/config.json: need exactly one"):
        embeddings.Encoder(folder)
    (folder / "modules.json").write_text(json.dumps([*modules, {"type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(ValueError, match=r"modules.json: modules .*Dense"):
        embeddings.Encoder(folder)
