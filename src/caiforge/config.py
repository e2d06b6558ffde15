"""Typed stage configs and the one loader every stage uses.

Authoring happens in `conf/` (Hydra groups); `params.yaml` is its composition (written by `dvc exp run` or
`caiforge params`) and is the file DVC fingerprints. A stage sees only the params it declares in `dvc.yaml`: the
loader asks DVC for exactly those, applies `key=value` overrides given on the command line, and builds a frozen
dataclass. Unknown keys and wrong types are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import types
import typing
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

log = logging.getLogger(__name__)

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
"""The project checkout this package lives in (src layout); the fallback when the cwd is not in a DVC project."""

CONFIG_NAME = "config"


class ConfigError(ValueError):
    """A param is unknown, missing or of the wrong type; the message names the file and the key."""


class StageError(RuntimeError):
    """A stage cannot go on for a reason outside its inputs (e.g. no server answers); it exits with the message."""


# ---------------------------------------------------------------------------------------------------------------
# Building typed configs


def build(cls: type[T], data: Any, where: str, key: str = "") -> T:
    """Build dataclass `cls` from plain data, checking every key and type.

    `where` names the source (a file) and `key` the dotted path so far; both appear in every error.
    Supported field types: bool, int, float, str, None, Literal, X | None, list/tuple of X, dict[str, X] and
    nested dataclasses. Lists become tuples so that the result is deeply immutable.
    """
    return _convert(cls, data, where, key)


def did_you_mean(name: str, known: typing.Iterable[str]) -> str:
    """` (did you mean eval_fraction?)` for the closest known key, else ` (known keys: a, b, ...)`."""
    import difflib

    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(known)})"


def _fail(where: str, key: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"{where}: {key or '<root>'}: {msg}")


def _convert(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value  # already built and validated (e.g. a parsed constitution)
        if not isinstance(value, Mapping):
            _fail(where, key, f"expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            _fail(where, _join(key, unknown[0]), f"unknown key{did_you_mean(unknown[0], fields)}")
        kwargs = {}
        for name, field in fields.items():
            sub = _join(key, name)
            if name in value:
                kwargs[name] = _convert(hints[name], value[name], where, sub)
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                _fail(where, sub, "missing required key")
        try:
            return tp(**kwargs)
        except (ValueError, TypeError) as exc:
            _fail(where, key, str(exc))
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            _fail(where, key, f"must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            _fail(where, key, "must not be null")
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, where, key)
            except ConfigError as exc:
                errors.append(str(exc))
        _fail(where, key, f"{value!r} matches none of {[getattr(a, '__name__', str(a)) for a in args]}")
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, list | tuple):
            _fail(where, key, f"expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_convert(item, v, where, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            _fail(where, key, f"expected a mapping, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        item = args[1] if args else Any
        return types.MappingProxyType({str(k): _convert(item, v, where, _join(key, str(k))) for k, v in value.items()})
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(where, key, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, key, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (str, bool):
        if type(value) is not tp:
            _fail(where, key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    if tp is type(None):
        if value is not None:
            _fail(where, key, f"expected null, got {value!r}")
        return None
    raise TypeError(f"unsupported config field type {tp!r} at {key}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def to_dict(cfg: Any) -> Any:
    """Plain-data view of a built config (tuples -> lists, mappings -> dicts), for saving next to outputs."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [to_dict(v) for v in cfg]
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Composition (conf/ -> params.yaml)


def project_root(start: Path | None = None) -> Path:
    """The DVC project at or above `start` (default: the cwd, which is where DVC runs stages), else ROOT."""
    here = (start or Path.cwd()).resolve()
    for path in (here, *here.parents):
        if (path / "dvc.yaml").is_file() and (path / ".dvc").is_dir():
            return path
    return ROOT


def compose(overrides: Sequence[str] = (), config_dir: Path | None = None) -> dict[str, Any]:
    """Compose `conf/` exactly as DVC's Hydra integration does, resolved to plain data."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    config_dir = (config_dir or project_root() / "conf").resolve()
    with initialize_config_dir(str(config_dir), version_base=None):
        cfg = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return typing.cast(dict[str, Any], OmegaConf.to_container(cfg))


def write_params(path: Path, overrides: Sequence[str] = (), config_dir: Path | None = None) -> None:
    """Write the composition of `conf/` to `path` with DVC's own dumper, so it matches what `dvc exp run` writes."""
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    config_dir = (config_dir or project_root() / "conf").resolve()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        compose_and_dump(tmp, str(config_dir), None, CONFIG_NAME, str(config_dir), list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"{config_dir}: cannot compose with overrides {list(overrides)}: {exc}") from exc
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Loading one stage's declared params


CONSTITUTIONS = "constitutions"
"""The folder dvc.yaml reads constitution parts from (`constitutions/${constitution}.yaml`)."""


def declared_params(
    stage: str, root: Path | None = None, constitution: Path | None = None, repo: Any = None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """The params `stage` declares in dvc.yaml: top-level key -> (file it comes from, value).

    Reading through DVC makes an undeclared read impossible: a key the stage does not list never reaches it.
    `constitution`: read the constitution parts from this file instead of the configured one (`caiforge
    constitution check FILE`). `repo`: an open DVC Repo to reuse (checking every stage opens it once).
    """
    from dvc.repo import Repo

    if repo is None:
        with Repo(str(root or project_root())) as opened:
            return declared_params(stage, root, constitution, opened)
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for dep in _stage(repo, stage).params:
        rel = os.path.relpath(dep.fs_path, repo.root_dir)
        if Path(rel).parent == Path(CONSTITUTIONS) and constitution is not None:
            from caiforge import constitution as parts

            rel, data = str(constitution), parts.read_data(constitution)
            if not isinstance(data, dict):
                raise ConfigError(f"{rel}: expected a mapping of constitution parts")
            values = {k: v for k, v in data.items() if k in dep.params}  # only the parts the stage declares
            missing = [part for part in dep.params if part not in values]
            if missing:
                raise ConfigError(f"{rel}: missing {', '.join(map(repr, missing))}, which stage {stage!r} needs")
        else:
            if not Path(dep.fs_path).is_file():
                raise ConfigError(
                    f"{rel}: params file declared by stage {stage!r} does not exist{_others(repo.root_dir, rel)}"
                )
            values = _read_params(dep, rel)
        for wanted in dep.params:
            if _lookup(values, wanted) is _MISSING:
                raise ConfigError(f"{rel}: {wanted}: missing key declared by stage {stage!r} in dvc.yaml")
        for top, value in values.items():
            if top in out:
                raise ConfigError(f"{rel}: {top}: also declared from {out[top][0]} for stage {stage!r}")
            out[top] = (rel, value)
    return out


_LOADERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stage(repo: Any, stage: str) -> Any:
    """dvc.yaml's stage `stage`, from one parse of dvc.yaml and dvc.lock per open Repo: `repo.stage.collect` parses
    both files again for every stage (with ruamel, about 0.6 s on cpu_demo's lock file), which made `check`, which
    reads all nine, cost 5 s of its 8."""
    from dvc.dvcfile import load_file
    from dvc.exceptions import DvcException

    loader = _LOADERS.get(repo)
    if loader is None:
        loader = _LOADERS[repo] = load_file(repo, os.path.join(repo.root_dir, "dvc.yaml")).stages
    try:
        return loader[stage]
    except DvcException:
        raise ConfigError(f"dvc.yaml: stage {stage!r} not found") from None


def _others(root: str, rel: str) -> str:
    """For a missing constitution file: the ones that exist."""
    if Path(rel).parent != Path(CONSTITUTIONS):
        return ""
    names = sorted(p.stem for p in (Path(root) / CONSTITUTIONS).glob("*.yaml"))
    return f" (constitutions here: {', '.join(names) or 'none'}; set `constitution:` to one of them)"


_MISSING = object()


def _read_params(dep: Any, rel: str) -> dict[str, Any]:
    """A declared params file's values through DVC; a file DVC cannot parse is a ConfigError naming its line."""
    try:
        return dep.read_params(flatten=False)
    except Exception as exc:  # DVC wraps decoding and YAML errors in its own types
        from caiforge import io

        try:
            text = io.read_utf8(dep.fs_path)
        except ValueError as bad:
            raise ConfigError(str(bad).replace(str(dep.fs_path), rel, 1)) from None
        try:
            import yaml

            yaml.safe_load(text)
        except yaml.YAMLError as bad:
            raise ConfigError(f"{rel}: not valid YAML: {' '.join(str(bad).split())}") from None
        raise ConfigError(f"{rel}: cannot read its params: {exc}") from None


def _lookup(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return _MISSING
        data = data[part]
    return data


def parse_value(raw: str) -> Any:
    """A command-line value as YAML, reading `1e-4` as a float (YAML 1.1 would keep it a string)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _FLOAT.fullmatch(value):
        return float(value)
    return value


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def apply_overrides(values: dict[str, tuple[str, Any]], overrides: Sequence[str]) -> dict[str, tuple[str, Any]]:
    """Apply Hydra-style `a.b.c=value` overrides to declared params; a key the stage did not declare is an error."""
    import copy

    out = copy.deepcopy(values)
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted:
            raise ConfigError(f"command line: {item!r}: expected key=value")
        top, *rest = dotted.split(".")
        if top not in out:
            raise ConfigError(f"command line: {dotted}: not a param this stage declares ({', '.join(sorted(out))})")
        source, node = out[top]
        if not rest:
            out[top] = (source, parse_value(raw))
            continue
        for part in rest:
            if not isinstance(node, dict) or part not in node:
                hint = did_you_mean(part, node) if isinstance(node, dict) else ""
                raise ConfigError(f"command line: {dotted}: unknown key{hint}")
            if part != rest[-1]:
                node = node[part]
        node[rest[-1]] = parse_value(raw)
    return out


def from_declared(stage: str, cls: type[T], values: Mapping[str, tuple[str, Any]]) -> T:
    """Build `cls` from the stage's section of params.yaml, plus its constitution parts when it declares any."""
    if stage not in values:
        raise ConfigError(f"dvc.yaml: stage {stage!r} does not declare its params section {stage!r}")
    source, section = values[stage]
    data = dict(section)
    # `launch` (process counts) is read by caiforge.launch, not by the stage: declared so a change reruns it.
    others = {k: v for k, v in values.items() if k not in (stage, "launch")}
    if others:
        field_names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if "constitution" not in field_names:
            raise ConfigError(f"dvc.yaml: stage {stage!r} declares {sorted(others)} but its config does not use them")
        from caiforge import constitution

        files = {src for src, _ in others.values()}
        if len(files) != 1:
            raise ConfigError(f"dvc.yaml: stage {stage!r} declares constitution parts from several files: {files}")
        (file,) = files
        parts = {k: v for k, (_, v) in others.items()}
        data["constitution"] = constitution.parse(parts, source=file, require=tuple(parts))
    return build(cls, data, source, stage)


def load(stage: str, cls: type[T], argv: Sequence[str] | None = None, root: Path | None = None) -> T:
    """The stage entry point's loader: declared params + command-line overrides -> frozen `cls`."""
    argv = sys.argv[1:] if argv is None else argv
    values = apply_overrides(declared_params(stage, root), argv)
    return from_declared(stage, cls, values)


def require_caps(cfg: Any, *names: str) -> None:
    """Each named cap (e.g. `max_prompts`) must be null (no cap) or >= 1: a cap of 0 would build from nothing."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or null (no cap), got {value}")


ADHOC_DIR = "outputs"
"""Where a stage run by hand (not by `dvc repro`) writes by default: git-ignored, never a DVC output."""


def _outside_dvc(stage: str, cfg: T) -> T:
    """A stage run by hand writes to outputs/<stage>/, not to the DVC output data/<stage>/ (which an ad-hoc run
    would silently clobber, leaving the workspace out of step with dvc.lock), and its row cache does not count it as
    a build (`RowCacheConfig.build`). DVC sets DVC_STAGE for the stages it runs; `<stage>.out_dir=...` on the
    command line writes wherever it says, data/ included."""
    from caiforge import planmode

    if os.environ.get("DVC_STAGE") or planmode.active():
        return cfg
    cache = getattr(cfg, "row_cache", None)  # a rowcache.RowCacheConfig (not imported: stages without one skip it)
    if dataclasses.is_dataclass(cache) and "build" in {f.name for f in dataclasses.fields(cache)}:
        cfg = dataclasses.replace(cfg, row_cache=dataclasses.replace(cache, build=False))  # type: ignore[type-var]
    out_dir = getattr(cfg, "out_dir", None)
    if not isinstance(out_dir, str):
        return cfg
    if any(arg.startswith(f"{stage}.out_dir=") for arg in sys.argv[1:]):
        return cfg
    adhoc = f"{ADHOC_DIR}/{stage}"
    log.warning(
        "%s: run outside `dvc repro`, so it writes to %s/, not to the DVC output %s/ (pass %s.out_dir=%s to "
        "overwrite that)",
        stage,
        adhoc,
        out_dir,
        stage,
        out_dir,
    )
    return dataclasses.replace(cfg, out_dir=adhoc)  # type: ignore[type-var]


def stage_main(stage: str, cls: type[T], run: typing.Callable[[T], Any]) -> None:
    """Shared `main()` of stage scripts: logging, config, run; a config or input error exits non-zero, cleanly."""
    from caiforge import planmode

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = _outside_dvc(stage, load(stage, cls))
        from caiforge import io

        # Under `accelerate launch`, only rank 0 touches outputs.
        if isinstance(getattr(cfg, "out_dir", None), str) and not planmode.active() and io.is_main_process():
            for path in io.remove_stale_temporaries(cfg.out_dir):
                logging.getLogger("caiforge").info("%s: removed %s, left by a killed run", stage, path)
        if not planmode.active():
            from caiforge import distributed

            distributed.init()  # under `accelerate launch`: the process group, and this process's GPU
        run(cfg)
    except planmode.Done:
        return  # `caiforge plan`: the stage has counted its requests and writes nothing
    except (ConfigError, FileNotFoundError, ValueError, StageError) as exc:
        sys.exit(f"{stage}: error: {exc}")
    finally:
        serving = sys.modules.get("caiforge.engines.serving")
        if serving is not None:
            serving.stop_all()  # managed servers end with their stage, however it ends
