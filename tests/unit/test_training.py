"""Pure pieces of caiforge.training: the held-out completion loss and the global-batch record."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from caiforge import formats, models, training


def test_completion_loss_is_the_token_weighted_completion_cross_entropy(tiny_model_dir):
    model, tokenizer = models.load_pretrained(tiny_model_dir)
    prompts = [[{"role": "user", "content": "Hi there"}], [{"role": "user", "content": "A longer question, please?"}]]
    answers = ["Hello!", "A much longer answer than the first."]
    rows = formats.completion_dataset(tokenizer, prompts, answers, [True, True])
    # The model's own loss with the prompt masked out, row by row, weighted by completion tokens.
    total, tokens = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = ids.clone()
        labels[0, torch.tensor(row["completion_mask"]) == 0] = -100
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=labels).loss)
        n = sum(row["completion_mask"][1:])
        total, tokens = total + loss * n, tokens + n
    assert training.completion_loss(model, rows, max_length=512) == pytest.approx(total / tokens, rel=1e-5)
    short = training.completion_loss(model, rows, max_length=len(rows[0]["input_ids"]) - 1)
    assert short != pytest.approx(total / tokens, rel=1e-5), "truncation to max_length applies, as in training"
    assert training.completion_loss(model, rows.select([]), max_length=512) is None
    model.train()
    training.completion_loss(model, rows, max_length=512)
    assert model.training, "the model's train/eval mode is restored"


def test_batch_metrics_multiply_out_the_global_batch(monkeypatch):
    """Pure arithmetic and naming; the launch tests check the same keys on real multi-process runs."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    class Schedule:
        batch_size, gradient_accumulation_steps = 3, 2

    def trainer(kind: DistributedType, **plugins) -> SimpleNamespace:
        return SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(distributed_type=kind, **plugins)))

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    one = training.batch_metrics(Schedule(), trainer(DistributedType.NO))
    assert (one["global_batch_size"], one["parallelism"]) == (6, "NO") and training.is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    fsdp = trainer(DistributedType.FSDP, fsdp_plugin=SimpleNamespace(fsdp_version=2))
    assert training.batch_metrics(Schedule(), fsdp) == {
        "parallelism": "FSDP2",
        "processes": 4,
        "per_device_batch_size": 3,
        "gradient_accumulation_steps": 2,
        "global_batch_size": 24,
    }
    zero = trainer(DistributedType.DEEPSPEED, deepspeed_plugin=SimpleNamespace(zero_stage=3))
    assert training.parallelism(zero) == "DEEPSPEED_ZERO3"
    assert not training.is_main_process()


def test_kernel_choices_resolve_to_what_this_machine_can_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training.attention("auto") == "sdpa"
    assert training.attention("eager") == "eager"
    assert training.fused_loss("auto") is False and training.fused_loss("none") is False
    assert training.padding_free("auto", "sdpa") is False and training.padding_free("padded", "sdpa") is False
    with pytest.raises(ValueError, match="attention: flash_attention_2 needs a CUDA device and the flash-attn"):
        training.attention("flash_attention_2")
    with pytest.raises(ValueError, match="fused_loss: liger needs a CUDA device and the liger-kernel"):
        training.fused_loss("liger")
    with pytest.raises(ValueError, match="batching: padding_free needs attention flash_attention_2"):
        training.padding_free("padding_free", "sdpa")
    # A GPU with both packages: auto takes FlashAttention 2, Liger and padding-free batches.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(training, "_installed", lambda module: module in {"flash_attn", "liger_kernel"})
    assert training.attention("auto") == "flash_attention_2"
    assert training.fused_loss("auto") is True
    assert training.padding_free("auto", "flash_attention_2") is True
    monkeypatch.setattr(training, "_installed", lambda module: False)
    assert training.attention("auto") == "sdpa" and training.fused_loss("auto") is False


def test_the_kernel_choice_reaches_the_model_and_the_trainer(tiny_model_dir):
    for kernel in ("eager", "sdpa"):
        model, _ = models.load_pretrained(tiny_model_dir, attention=kernel)
        assert model.config._attn_implementation == kernel
    args = training.common_args(out_dir=Path("x"), seed=0, precision_choice="fp32", gradient_checkpointing=True)
    assert args["use_liger_kernel"] is False and args["gradient_checkpointing"] is True
    assert training.prompt_completion_args(64, padding_free=True)["padding_free"] is True
    assert training.prompt_completion_args(64)["padding_free"] is False


def test_unsharded_rebuilds_the_model_around_gathered_weights_even_under_zero3(tiny_model_dir, monkeypatch):
    """`unsharded` builds an empty copy of the architecture and takes the gathered tensors as they are (a tied
    output layer may be missing from them); a ZeRO-3 run's live config must not make that copy a partitioned one.
    The real sharded path (FSDP2 over gloo) is tests/stages/test_launch.py."""
    import peft
    from transformers.integrations import deepspeed

    model, _ = models.load_pretrained(tiny_model_dir)
    state = {k: v.clone() + 1 for k, v in model.state_dict().items() if k != "lm_head.weight"}
    plain = training.unsharded(model, state)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in state.items())
    if model.config.tie_word_embeddings:
        assert plain.lm_head.weight is plain.model.embed_tokens.weight
    with pytest.raises(RuntimeError, match="unexpected"):
        training.unsharded(model, {**state, "stray.weight": torch.zeros(1)})

    class Zero3:  # what transformers consults (is_deepspeed_zero3_enabled) while a ZeRO-3 Trainer is alive
        def is_zero3(self) -> bool:
            return True

    live = Zero3()
    with monkeypatch.context() as patched:
        patched.setattr(deepspeed, "_hf_deepspeed_config_weak_ref", lambda: live)
        assert deepspeed.is_deepspeed_zero3_enabled()
        assert torch.equal(training.unsharded(model, state).model.norm.weight, state["model.norm.weight"])
        assert deepspeed.is_deepspeed_zero3_enabled(), "the live config is back afterwards"

    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    rebuilt = training.unsharded(lora, lora.state_dict())
    assert isinstance(rebuilt, peft.PeftModel)
    assert rebuilt.state_dict().keys() == lora.state_dict().keys()


@pytest.mark.parametrize(("max_steps", "written"), [(4, ["checkpoint-2"]), (5, ["checkpoint-2", "checkpoint-4"])])
def test_checkpoints_are_written_every_n_steps_but_not_at_the_last(tiny_model_dir, tmp_path, max_steps, written):
    """A real Trainer with the stage's checkpoint arguments and callback; the last step's checkpoint (weights and
    optimizer state the stage would delete right after saving its model) is not written, also where it is a
    periodic one."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model, _ = models.load_pretrained(tiny_model_dir)
    ckpt = training.Checkpoints(2, tmp_path, "f" * 64, tmp_path / "dvclive")
    saved = []

    class Seen(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saved.append(state.global_step)

    args = TrainingArguments(
        **ckpt.args(tmp_path / "scratch"), max_steps=max_steps, per_device_train_batch_size=1, use_cpu=True,
        report_to=[], logging_steps=1, disable_tqdm=True,
    )  # fmt: skip
    data = Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 8, "labels": [[1, 2, 3, 4]] * 8})
    Trainer(model=model, args=args, train_dataset=data, callbacks=[ckpt.callback(), Seen()]).train()
    assert sorted(p.name for p in ckpt.dir.iterdir()) == written
    assert all((ckpt.dir / name / training.COMPLETE).is_file() for name in written)
    assert saved == [int(name.split("-")[1]) for name in written]
    assert ckpt.latest() == ckpt.dir / written[-1]
