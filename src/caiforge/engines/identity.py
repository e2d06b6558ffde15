"""What identifies the answers a role gets: the one answer every engine, managed serving and `caiforge plan` use.

A role's identity goes into every row-cache key, the stats and the rows' provenance (`model_fingerprint`):

- in-process (transformers): the fingerprint of the role's model directory (a role link followed); the dtype and
  device go into each row's key beside it (`hf.TransformersEngine.shape_key`);
- on servers: `openai:<served>@<weights>`, or `openai:<served>` when nothing identifies the weights (such rows are
  never reused). `served` is the model id the servers report, or for managed servers `managed_label`: every
  launch setting that can change an answer. `weights` is what `weights` says.

Under `caiforge plan`, weights a stage upstream retrains in this build are `pending:<dir>` (every request to them
depends on the build).
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from caiforge.engines import conversion
from caiforge.engines.serving import SERVED_NAME, ManagedConfig, needs_gguf, serves_model_dir

if TYPE_CHECKING:
    from caiforge.engines import ServerConfig


def fingerprint(model_dir: str | Path) -> str:
    """The sha256 fingerprint of a saved model's files (a role link is followed)."""
    from caiforge import models

    return models.fingerprint(models.file_digests(models.resolve(model_dir)))


def pending(model_dir: str | Path, outputs: Sequence[str]) -> str | None:
    """`pending:<dir>` when `model_dir` is, or lies inside, one of `outputs` (what this build has yet to produce)."""
    from caiforge.planmode import PENDING

    here = Path(model_dir).resolve()
    for out in outputs:
        if here == Path(out).resolve() or Path(out).resolve() in here.parents:
            return PENDING + str(model_dir)
    return None


def weights(model_dir: str | Path, server: ServerConfig | None = None, outputs: Sequence[str] = ()) -> str | None:
    """What identifies the weights the role runs: in-process (`server` None), the directory's fingerprint; on
    servers, what `server.weights` says: the directory's fingerprint (`model_dir`, and always for managed servers
    that serve it), a stated `revision:<text>` (a managed command that serves something else must state one), or
    None. Weights in `outputs` (`caiforge plan`: this build retrains them) are `pending:<dir>`."""
    managed = server is not None and server.managed.launch != "none"
    if managed and not serves_model_dir(server.managed):
        return server.weights
    if server is not None and server.weights != "model_dir" and not managed:
        return server.weights
    waiting = pending(model_dir, outputs)
    if waiting:
        return waiting
    try:
        return fingerprint(model_dir)
    except (FileNotFoundError, ValueError) as err:
        if server is None:
            raise
        raise FileNotFoundError(
            f"server.weights is 'model_dir', but {model_dir} holds no model to fingerprint ({err})"
        ) from err


def managed_label(cfg: ManagedConfig) -> str:
    """The served part of a managed role's identity: SERVED_NAME and every launch setting that can change an
    answer: the launcher, its tensor-parallel size, the GGUF type and converter, the extra arguments
    (`--quantization fp8`, `--dtype`, ...) and a command template. Known before the servers start, so a build
    whose rows are all cached starts none and `caiforge plan` counts the rows the build will reuse."""
    parts = [cfg.launch]
    if cfg.gpus_per_replica:
        parts.append(f"tp{cfg.gpus_per_replica}")
    if needs_gguf(cfg):
        parts.append(f"{cfg.gguf_type}-conv{conversion.converter_version()}")
    for name, value in (("command", cfg.command if cfg.launch == "command" else None), ("args", cfg.args)):
        if value:
            text = value if isinstance(value, str) else shlex.join(value)
            parts.append(f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}")
    return f"{SERVED_NAME}[{','.join(parts)}]"


def served(served_model: str, weights_id: str | None) -> str:
    """A served role's identity from the model name it is served under and what identifies its weights."""
    return f"openai:{served_model}@{weights_id}" if weights_id else f"openai:{served_model}"


def weights_of(identity: str) -> str | None:
    """The weights an identity names: an in-process identity is its weights' fingerprint; a served one's
    (`openai:<id>@<weights>`) is what follows the last `@`, or None when nothing identifies them."""
    if not identity.startswith("openai:"):
        return identity
    _, at, found = identity.rpartition("@")
    return found if at else None


def same_weights(identity: str, others: Sequence[str]) -> bool | None:
    """Whether `identity` runs the same weights as one of `others`, across backends (a model served with
    `server.weights: model_dir` matches its in-process self); None when some weights are unknown."""
    mine, theirs = weights_of(identity), [weights_of(o) for o in others]
    if mine is not None and mine in theirs:
        return True
    return None if mine is None or None in theirs else False
