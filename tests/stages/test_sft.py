"""sft on the smoke profile: the model trains (parameters change), outputs are complete."""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from caiforge import config, io, models, schemas
from tests.conftest import load_stage, smoke_section

stage = load_stage("sft")


def write_sft(path, n=12):
    rows = [
        {
            "prompt_id": f"p{i:03d}",
            "kind": "red_team" if i % 3 else "helpful",
            "prompt": [{"role": "user", "content": f"Question number {i}: how do I stay safe?"}],
            "completion": [{"role": "assistant", "content": f"Answer {i}: be careful and ask for help."}],
            "round": 1 if i % 3 else 0,
        }
        for i in range(n)
    ]
    io.write_parquet(pl.DataFrame(rows, schema=dict(schemas.SFT.columns)), path, schemas.SFT)


def make_cfg(tmp_path, tiny_model_dir, overrides=()):
    section = smoke_section("sft", list(overrides))
    write_sft(tmp_path / "sft.parquet")
    section.update(data=str(tmp_path / "sft.parquet"), policy=str(tiny_model_dir), out_dir=str(tmp_path / "out"))
    return config.build(stage.SftConfig, section, "params.yaml", "sft")


def weights(path):
    return load_file(str(path / "model.safetensors"))


def test_full_finetune_changes_parameters(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    metrics = stage.run(cfg)
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"model", "dvclive", "metrics.json"}
    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "tokenizer.json").is_file()
    saved = json.loads((out / "model" / "caiforge_config.json").read_text())
    assert saved["learning_rate"] == cfg.learning_rate
    before, after = weights(tiny_model_dir), weights(out / "model")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before), f"unchanged tensors: {set(before) - set(changed)}"
    assert metrics["steps"] > 0 and metrics["final_train_loss"] is not None
    assert (out / "dvclive" / "metrics.json").is_file() or any((out / "dvclive").rglob("*.tsv"))
    model, _ = models.load_pretrained(out / "model")
    assert model.config.hidden_size == 64
    # It generates with its KV cache: the Trainer turned it off, and TRL's sampling from it recomputed every token.
    assert model.config.use_cache and model.generation_config.use_cache
    assert json.loads((out / "model" / "generation_config.json").read_text())["use_cache"] is True


def test_lora_is_merged_into_saved_weights(tmp_path, tiny_model_dir):
    cfg = make_cfg(
        tmp_path,
        tiny_model_dir,
        ["sft.lora.enabled=true", "sft.learning_rate=0.01", "sft.lora.target_modules=[q_proj,v_proj]"],
    )
    stage.run(cfg)
    after = weights(tmp_path / "out" / "model")
    assert not any("lora" in k for k in after), "adapters must be merged, not saved separately"
    before = weights(tiny_model_dir)
    assert not torch.equal(
        before["model.layers.0.self_attn.q_proj.weight"], after["model.layers.0.self_attn.q_proj.weight"]
    )
    assert torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])


def test_a_cut_off_revision_is_trained_without_the_end_token(tiny_model_dir):
    """sft.parquet's `finished` reaches the training rows: a revision that hit the token cap is not closed by the
    chat template's end token (which would teach the model to stop mid-sentence)."""
    _, tok = models.load_pretrained(tiny_model_dir)
    rows = pl.DataFrame(
        [
            {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": a}],
             "finished": done}
            for a, done in (("A whole answer.", True), ("An answer cut off at", False))
        ]
    )  # fmt: skip
    end = tok.convert_tokens_to_ids("<|im_end|>")
    done, cut = stage.chats(tok, rows)
    completion = lambda row: [i for i, m in zip(row["input_ids"], row["completion_mask"], strict=True) if m]  # noqa: E731
    assert end in completion(done) and end not in completion(cut)


def test_attention_kernels_train_the_same_weights(tmp_path, tiny_model_dir):
    """eager and SDPA are two kernels for one computation: the stage's choice changes speed, not the model."""
    trained = {}
    for kernel in ("eager", "sdpa"):
        cfg = make_cfg(tmp_path / kernel, tiny_model_dir, [f"sft.attention={kernel}"])
        stage.run(cfg)
        trained[kernel] = weights(tmp_path / kernel / "out" / "model")
    gap = max(float((trained["eager"][k] - trained["sdpa"][k]).abs().max()) for k in trained["eager"])
    assert gap < 1e-5, f"eager and sdpa weights differ by {gap}"


def test_padding_free_without_flash_attention_is_refused_before_training(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, ["sft.batching=padding_free", "sft.attention=sdpa"])
    with pytest.raises(ValueError, match="batching: padding_free needs attention flash_attention_2"):
        stage.run(cfg)
    assert not (tmp_path / "out").exists()
