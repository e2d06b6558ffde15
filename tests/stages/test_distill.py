"""distill on the smoke profile, per method and student init: outputs complete, the student is trained, metrics."""

from __future__ import annotations

import dataclasses
import json

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from caiforge import config, engines, formats, models
from tests.conftest import load_stage, smoke_section, write_prompts

stage = load_stage("distill")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A different tiny model (other seed, 1 layer) with the same tokenizer, standing in for the `student` role."""
    out = tmp_path_factory.mktemp("student") / "student"
    model, tokenizer = models.build_tiny(models.TinySpec(num_hidden_layers=1), seed=1)
    models.save(model, tokenizer, out)
    return out


def make_cfg(tmp_path, teacher_dir, student_dir, overrides=()):
    section = smoke_section("distill", list(overrides))
    section.update(
        prompts=str(write_prompts(tmp_path / "prompts.parquet")),
        teacher=str(teacher_dir),
        student=str(student_dir),
        out_dir=str(tmp_path / "distill"),
    )
    return config.build(stage.DistillConfig, section, "params.yaml", "distill")


def weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize("init", ["prune", "student"])
@pytest.mark.parametrize("method", ["logit", "sequence"])
def test_distill_trains_a_smaller_student(tmp_path, tiny_model_dir, student_dir, method, init):
    cfg = make_cfg(tmp_path, tiny_model_dir, student_dir, [f"distill.method={method}", f"distill.init={init}"])
    metrics = stage.run(cfg)
    out = tmp_path / "distill"
    assert {p.name for p in out.iterdir()} == {"model", "dvclive", "metrics.json"}
    assert {"config.json", "model.safetensors", "tokenizer.json", "caiforge_config.json"} <= {
        p.name for p in (out / "model").iterdir()
    }
    saved = json.loads((out / "model" / "caiforge_config.json").read_text())
    assert (saved["method"], saved["init"]) == (method, init)
    assert json.loads((out / "metrics.json").read_text()) == metrics

    teacher, after = weights(tiny_model_dir), weights(out / "model")
    if init == "prune":
        assert metrics["kept_layers"] == [0] and metrics["student_layers"] == 1 and metrics["teacher_layers"] == 2
        start = {k: v for k, v in teacher.items() if not k.startswith("model.layers.1.")}
    else:
        assert metrics["kept_layers"] is None
        start = weights(student_dir)
    assert start.keys() == after.keys()
    assert all(not torch.equal(start[k], after[k]) for k in start), "every student tensor must train"
    assert metrics["student_parameters"] < metrics["teacher_parameters"]
    assert metrics["compression"] > 1
    assert metrics["steps"] > 0 and metrics["distillation_loss"] is not None
    for when in ("heldout_before", "heldout_after"):
        assert metrics[when]["tokens"] > 0
        assert 0 <= metrics[when]["top1_agreement"] <= 1 and metrics[when]["kl_per_token"] >= 0
    assert metrics["heldout_prompts"] > 0 and metrics["train_rows"] > 0
    talks = metrics["heldout_answers"]
    assert talks["prompts"] == metrics["heldout_prompts"]
    for key in ("distinct_2_teacher", "distinct_2_student", "degenerate_teacher", "degenerate_student"):
        assert 0 <= talks[key] <= 1, key
    asked = metrics["train_rows"] + metrics["dropped_answers"]["rows"] + metrics["heldout_prompts"]
    assert metrics["teacher_generation"]["rows"] == asked
    assert any((out / "dvclive").rglob("*.tsv"))


def test_a_rerun_asks_the_teacher_nothing_and_writes_the_identical_model(tmp_path, tiny_model_dir, student_dir):
    """The teacher's answers go through the row cache: a rerun (after a training that failed, say) takes every one
    from there and trains the same student, byte for byte."""
    cfg = make_cfg(tmp_path, tiny_model_dir, student_dir, [f"distill.row_cache.dir={tmp_path / 'rows'}"])
    first = stage.run(cfg)
    files = {p.name: p.read_bytes() for p in (tmp_path / "distill" / "model").iterdir()}
    second = stage.run(cfg)
    assert {p.name: p.read_bytes() for p in (tmp_path / "distill" / "model").iterdir()} == files
    rows = first["teacher_generation"]["rows"]
    assert rows == first["train_rows"] + first["dropped_answers"]["rows"] + first["heldout_prompts"] > 0
    assert (first["row_cache"]["misses"], second["row_cache"]) == (rows, {"hits": rows, "misses": 0, "entries": rows})
    drop = {"train_seconds", "teacher_generation", "row_cache"}
    assert {k: v for k, v in first.items() if k not in drop} == {k: v for k, v in second.items() if k not in drop}


LOOP = "I can help. I can help. I can help. I can help. I can help. I can help."


def test_usable_answers_drops_the_flagged_answers_and_counts_them_per_flag(tmp_path, tiny_model_dir, student_dir):
    train = pl.DataFrame(
        {
            "text": ["a", "b", "c", "d"],
            "answer": [LOOP, "Paris is the capital of France.", "It is a long answer that was cut", ""],
            "finished": [True, True, False, True],
        }
    )
    every = make_cfg(tmp_path, tiny_model_dir, student_dir, ["distill.drop_answers=[]"])
    assert stage.usable_answers(every, train) == (train, {"rows": 0, "flags": {}})
    cfg = make_cfg(tmp_path, tiny_model_dir, student_dir, ["distill.drop_answers=[empty,repetition,runaway]"])
    kept, dropped = stage.usable_answers(cfg, train)
    assert kept["text"].to_list() == ["b"]
    assert dropped == {"rows": 3, "flags": {"empty": 1, "repetition": 1, "runaway": 1}}
    loops = make_cfg(tmp_path, tiny_model_dir, student_dir, ["distill.drop_answers=[repetition]"])
    assert stage.usable_answers(loops, train)[0]["text"].to_list() == ["b", "c", "d"]
    with pytest.raises(ValueError, match=r"drop_answers=\['repetition'\] drops every one of 1 answers"):
        stage.usable_answers(loops, train.head(1))


def test_the_teacher_answers_with_the_instruction_and_the_student_learns_only_clean_answers_to_bare_prompts(
    tmp_path, tiny_model_dir, student_dir, monkeypatch
):
    """Context distillation: the instruction goes to the teacher on training prompts only (held-out prompts are
    answered as the student will be asked); the student trains on the bare prompts, without the answers that carry
    a `drop_answers` flag."""
    asked, trained = [], []
    real_answers, real_dataset = engines.stage_answers, formats.completion_dataset

    def answers(model_dir, gen, conversations, **kwargs):
        asked.extend(c[0]["content"] for c in conversations)
        outs, stats = real_answers(model_dir, gen, conversations, **kwargs)
        return [dataclasses.replace(outs[0], text=LOOP, finished=True), *outs[1:]], stats

    def dataset(tokenizer, chats, responses, finished):
        trained.extend(zip([c[0]["content"] for c in chats], responses, strict=True))
        return real_dataset(tokenizer, chats, responses, finished)

    monkeypatch.setattr(stage.engines, "stage_answers", answers)
    monkeypatch.setattr(stage.formats, "completion_dataset", dataset)
    cfg = make_cfg(
        tmp_path,
        tiny_model_dir,
        student_dir,
        ["distill.teacher_instruction=Be brief.", "distill.drop_answers=[repetition]"],
    )
    train, heldout = stage.split_prompts(cfg)
    metrics = stage.run(cfg)
    bare = train["text"].to_list()
    assert asked == [f"{t} Be brief." for t in bare] + heldout["text"].to_list()
    assert [t for t, _ in trained] == bare[1:], "the looping answer to the first prompt is not trained on"
    assert LOOP not in [a for _, a in trained]
    assert metrics["train_rows"] == len(bare) - 1 and metrics["dropped_answers"] == {
        "rows": 1,
        "flags": {"repetition": 1},
    }
    assert metrics["teacher_instruction"] == "Be brief."
    assert metrics["heldout_answers"]["prompts"] == heldout.height


def test_bad_params_are_rejected(tmp_path, tiny_model_dir, student_dir):
    with pytest.raises(config.ConfigError, match="prune_every must be >= 2"):
        make_cfg(tmp_path, tiny_model_dir, student_dir, ["distill.prune_every=1"])
    with pytest.raises(config.ConfigError, match="ce_weight"):
        make_cfg(tmp_path, tiny_model_dir, student_dir, ["distill.ce_weight=1.5"])
    with pytest.raises(config.ConfigError, match="drop_answers"):
        make_cfg(tmp_path, tiny_model_dir, student_dir, ["distill.drop_answers=[loops]"])


def test_missing_teacher_names_the_stage(tmp_path, student_dir):
    cfg = make_cfg(tmp_path, tmp_path / "nowhere", student_dir)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        stage.run(cfg)
    assert not (tmp_path / "distill").exists()
