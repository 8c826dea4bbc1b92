"""Published model versions under ``<lakehouse>/models/<name>/v<N>/``.

A version holds safetensors weights (loadable without executing pickled code), the model
config (factory + kwargs), the training config, the preprocessing spec, lineage (input tables
and versions), metrics and curves. Readers only see versions that hold a ``_COMMITTED``
marker, so a crash leaves no partial version visible. Two ways of getting there:

- a local folder (a plain path): the files go to a hidden temp folder that is renamed to
  ``v<N>`` (the next free N; a rename onto a taken N fails and is retried), then the marker is
  written (atomically, through ``sparkdl._fs``);
- a URI (``s3a://``, ``gs://``, ``hdfs://``, ``file://``...), where folders cannot be renamed
  atomically: the publisher claims ``v<N>`` with a ``_CLAIM`` file, writes the files into it
  one by one, and writes the marker last. A claimed version without a marker (a crash) stays
  invisible and the next publisher takes a higher N. Two publishers racing for the same name
  on an object store are not guarded beyond the claim check: publish one name from one job.

Nothing read from a version runs code: the weights are safetensors, the rest JSON. The model
is rebuilt from ``model_config.json``'s ``factory``, which only selects code this process
already trusts: a registered model name (``sparkdl.models.register_model``), an entry point of
the ``sparkdl.models`` group (an installed package), or ``module:attr`` of a module the reader
allowlisted (``trusted_modules=``, ``SPARKDL_TRUSTED_MODULES``, Spark conf
``spark.sparkdl.trustedModules``). Anyone who can write a lakehouse file can write that name, so
an unknown one is refused before anything is imported (see docs/security.md).

Names are checked on read as on write, so a name cannot reach outside ``<lakehouse>/models``.
``cleanup_models`` removes what interrupted publishers leave (``.tmp-*`` folders, versions
without a marker) once they are older than a threshold, never a committed version.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from sparkdl import _fs
from sparkdl.errors import ModelNotFoundError, UntrustedModelError
from sparkdl.lakehouse import Lakehouse
from sparkdl.session import conf_value

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["ModelVersion", "publish_model", "list_versions", "get_model_version", "load_model", "list_models",
           "trusted_modules", "check_model_factory", "cleanup_models", "TRUSTED_MODULES_ENV", "TRUSTED_MODULES_CONF", "ENTRY_POINT_GROUP"]

log = logging.getLogger("sparkdl.registry")

TRUSTED_MODULES_ENV = "SPARKDL_TRUSTED_MODULES"
"""Comma-separated modules whose ``module:attr`` model factories may be loaded from model configs."""
TRUSTED_MODULES_CONF = "spark.sparkdl.trustedModules"
"""The same allowlist as a Spark conf key (read on the driver, passed to executors explicitly)."""
ENTRY_POINT_GROUP = "sparkdl.models"
"""Entry-point group of model factories that installed packages provide."""

_MARKER = "_COMMITTED"
_CLAIM = "_CLAIM"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION_RE = re.compile(r"v(\d+)")


@dataclass(frozen=True)
class ModelVersion:
    """One published, committed version of a model."""

    name: str
    version: int
    uri: str
    """Folder of the version (a local path or a URI)."""
    model_config: dict[str, Any]
    training_config: dict[str, Any]
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    preprocessing: dict[str, Any] | None
    created_at: float


def _is_uri(root: str) -> bool:
    return "://" in str(root)


def _models_root(root: str) -> str:
    # Lakehouse() turns file:// into a plain path; keep the URI so that file:// exercises (and
    # tests) the same marker protocol as object stores.
    return _fs.join(str(root).rstrip("/"), "models") if _is_uri(root) else Lakehouse(root).models()


def _model_dir(root: str, name: str) -> str:
    return _fs.join(_models_root(root), name)


def _check_name(name: str) -> None:
    # Checked on every read too: "../../other/models/x" would otherwise resolve outside the lakehouse.
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"model name {name!r} is invalid: use letters, digits, '.', '_' and '-' only, "
                         "starting with a letter or digit (a model name is one folder under <lakehouse>/models)")


def _version_numbers(d: str) -> list[int]:
    """Every v<N> folder, committed or not."""
    return sorted(int(m.group(1)) for m in map(_VERSION_RE.fullmatch, _fs.listdir(d)) if m)


def list_versions(root: str, name: str) -> list[int]:
    """Committed versions of ``name`` (those with a marker), ascending."""
    _check_name(name)
    d = _model_dir(root, name)
    return [v for v in _version_numbers(d) if _fs.exists(_fs.join(d, f"v{v}", _MARKER))]


def _files(model: torch.nn.Module | None, docs: dict[str, Any], extra_files: dict[str, str] | None,
           weights_uri: str | None = None) -> dict[str, bytes]:
    from safetensors.torch import save

    if weights_uri is not None:
        files = {"model.safetensors": _fs.read_bytes(weights_uri)}
    else:
        files = {"model.safetensors": save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})}
    files.update({fname: json.dumps(obj, indent=2, default=str).encode() for fname, obj in docs.items()})
    for fname, src in (extra_files or {}).items():
        if src and _fs.exists(src):
            files[fname] = _fs.read_bytes(src)
    return files


def publish_model(root: str, name: str, *, model: torch.nn.Module | None = None, model_config: dict[str, Any],
                  training_config: dict[str, Any], lineage: dict[str, Any], metrics: dict[str, Any],
                  preprocessing: dict[str, Any] | None = None, extra_files: dict[str, str] | None = None,
                  weights_uri: str | None = None) -> ModelVersion:
    """Publish ``model`` as the next version of ``name``; ``extra_files`` maps file names in the
    version to source paths or URIs (e.g. the curves PNG).

    ``weights_uri`` instead of ``model``: a safetensors file the training ranks staged in the
    lakehouse (sharded models: FSDP, pipeline), committed as the version's weights as is, so
    the weights never pass through Spark's ``collect()``. It must hold the model's full state
    dict; ``load_model`` checks it against the model built from ``model_config``."""
    _check_name(name)
    if (model is None) == (weights_uri is None):
        raise ValueError("publish_model needs exactly one of model= and weights_uri=")
    created = time.time()
    files = _files(model, {"model_config.json": model_config, "training_config.json": training_config,
                           "lineage.json": lineage, "metrics.json": metrics, "preprocessing.json": preprocessing},
                   extra_files, weights_uri)
    d = _model_dir(root, name)
    version = _publish_by_rename(d, files) if not _is_uri(root) else _publish_by_claim(d, files)
    _fs.write_text(_fs.join(d, f"v{version}", _MARKER), json.dumps({"created_at": created}))
    try:  # best effort: what earlier interrupted publishers of this name left behind
        cleanup_models(root, name=name)
    except Exception:
        log.warning("could not clean up leftovers under %s", d, exc_info=True)
    return get_model_version(root, name, version)


def _publish_by_rename(d: str, files: dict[str, bytes]) -> int:
    base = Path(d)
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        for _ in range(100):
            version = max(_version_numbers(d), default=0) + 1
            try:
                tmp.rename(base / f"v{version}")  # atomic; fails if another publisher took v<N>
                return version
            except OSError:
                continue
        raise RuntimeError(f"could not allocate a version under {d}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish_by_claim(d: str, files: dict[str, bytes]) -> int:
    token = uuid.uuid4().hex
    for _ in range(100):
        version = max(_version_numbers(d), default=0) + 1
        claim = _fs.join(d, f"v{version}", _CLAIM)
        if _fs.exists(claim):
            continue
        _fs.write_text(claim, token)
        if _fs.read_text(claim) != token:  # another publisher claimed it in the meantime
            continue
        for fname, data in files.items():
            _fs.write_bytes(_fs.join(d, f"v{version}", fname), data)
        return version
    raise RuntimeError(f"could not allocate a version under {d}")


def list_models(root: str) -> list[str]:
    """Names of the models with at least one committed version."""
    return [m for m in _fs.listdir(_models_root(root)) if _NAME_RE.fullmatch(m) and list_versions(root, m)]


def get_model_version(root: str, name: str, version: int | None = None) -> ModelVersion:
    _check_name(name)
    if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
        raise ValueError(f"model version {version!r} is invalid: versions are integers from 1; None = the latest")
    versions = list_versions(root, name)
    if not versions:
        models = _models_root(root)
        raise ModelNotFoundError(f"no published model {name!r} under {models}; published models: {list_models(root)}")
    v = versions[-1] if version is None else version
    if v not in versions:
        raise ModelNotFoundError(f"model {name!r} has no version {v}; published versions: {versions}")
    d = _fs.join(_model_dir(root, name), f"v{v}")

    def read(fname: str) -> Any:
        return json.loads(_fs.read_text(_fs.join(d, fname)))

    return ModelVersion(name=name, version=v, uri=d, model_config=read("model_config.json"),
                        training_config=read("training_config.json"), lineage=read("lineage.json"),
                        metrics=read("metrics.json"), preprocessing=read("preprocessing.json"),
                        created_at=read(_MARKER)["created_at"])


def trusted_modules(extra: Iterable[str] | None = None, *, spark: "SparkSession | None" = None) -> list[str]:
    """The allowlist of modules whose ``module:attr`` factories a model config may name: ``extra``,
    plus ``SPARKDL_TRUSTED_MODULES`` (comma-separated), plus Spark conf ``spark.sparkdl.trustedModules``
    when ``spark`` is given. Resolve it on the driver and pass it to executors explicitly."""
    names = list(extra or [])
    names += (os.environ.get(TRUSTED_MODULES_ENV) or "").split(",")
    if spark is not None:
        names += (conf_value(spark, TRUSTED_MODULES_CONF) or "").split(",")
    out: list[str] = []
    for n in (n.strip() for n in names):
        if n and n not in out:
            out.append(n)
    return out


_allowlist = trusted_modules  # load_model's argument of the same name shadows it


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _factory(mv: ModelVersion, trusted: list[str]) -> "str | Callable[..., Any]":
    """What rebuilds ``mv`` (a registered name, a trusted 'module:attr', or an entry point's
    factory); refuses, before importing anything, a factory this process does not already trust."""
    from sparkdl.models import registered_models

    spec = mv.model_config.get("factory")
    if not isinstance(spec, str) or not spec:
        raise UntrustedModelError(f"model {mv.name} v{mv.version}: model_config.json has no factory name; "
                                  "republish the model")
    if spec in registered_models():
        return spec
    eps = _entry_points()
    if spec in eps:
        return eps[spec].load()
    if ":" in spec:
        module = spec.partition(":")[0]
        by_entry_point = any(ep.value.replace(" ", "") == spec for ep in eps.values())
        if by_entry_point or any(module == t or module.startswith(t + ".") for t in trusted):
            return spec
        raise UntrustedModelError(
            f"model {mv.name} v{mv.version} names the factory {spec!r} in its model_config.json; module "
            f"{module!r} is not trusted, so it was not imported (any writer of lakehouse files could name code "
            f"to run). If you trust this model's source, allowlist the module: load_model(..., trusted_modules="
            f"[{module!r}]), {TRUSTED_MODULES_ENV}={module} or --conf {TRUSTED_MODULES_CONF}={module}; or register "
            f"the factory (sparkdl.models.register_model, or an entry point in group {ENTRY_POINT_GROUP!r})")
    raise UntrustedModelError(
        f"model {mv.name} v{mv.version} names the factory {spec!r}, which is neither a registered model "
        f"({registered_models()}) nor an entry point of group {ENTRY_POINT_GROUP!r}; install or register it")


def check_model_factory(mv: ModelVersion, trusted_modules: Iterable[str] | None = None) -> None:
    """``UntrustedModelError`` now (on the driver, before any task) when ``load_model`` would refuse ``mv``."""
    _factory(mv, _allowlist(trusted_modules))


def load_model(root: str, name: str, version: int | None = None, *, map_location: str = "cpu",
               trusted_modules: Iterable[str] | None = None):
    """Rebuild the model from its config and load the safetensors weights: (module, ModelVersion).

    The config's factory must be a registered model, a ``sparkdl.models`` entry point, or
    ``module:attr`` of a trusted module (``trusted_modules``, ``SPARKDL_TRUSTED_MODULES``);
    anything else raises ``UntrustedModelError`` without importing it."""
    from safetensors.torch import load

    from sparkdl.models import build_published

    mv = get_model_version(root, name, version)
    # The trust check comes first: nothing the config names is imported unless it is trusted.
    model = build_published(mv.model_config, spec=mv.preprocessing, factory=_factory(mv, _allowlist(trusted_modules)))
    state = load(_fs.read_bytes(_fs.join(mv.uri, "model.safetensors")))
    model.load_state_dict(state)
    model.to(map_location)
    model.eval()
    return model, mv


def _age_s(uri: str, now: float) -> float | None:
    """Seconds since anything in ``uri`` (a file or a folder, one level deep) last changed."""
    fs, path = _fs.resolve(uri)
    from pyarrow import fs as pafs

    try:
        infos = [fs.get_file_info(path)]
        if infos[0].type == pafs.FileType.Directory:
            infos += fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError:
        return None
    stamps = [i.mtime.timestamp() for i in infos if i.mtime is not None]
    return now - max(stamps) if stamps else None


def cleanup_models(root: str, *, name: str | None = None, older_than: float = 3600.0,
                   dry_run: bool = False) -> list[str]:
    """Delete what interrupted publishers left under ``<root>/models`` (of ``name``, or of every
    model); return the deleted URIs.

    Candidates are hidden ``.tmp-*`` folders of the rename protocol, ``v<N>`` folders without a
    ``_COMMITTED`` marker, and ``*.tmp-*`` files of interrupted atomic writes. A publisher still at
    work keeps touching its folder, so only candidates unchanged for ``older_than`` seconds go,
    and a version's marker is checked again right before it is deleted: a committed version is
    never removed."""
    if older_than < 0:
        raise ValueError(f"older_than={older_than} must be >= 0 seconds; the default is one hour")
    if name is not None:
        _check_name(name)
    names = [name] if name is not None else [m for m in _fs.listdir(_models_root(root)) if _NAME_RE.fullmatch(m)]
    now = time.time()
    gone: list[str] = []
    for n in names:
        d = _model_dir(root, n)
        for entry in _fs.listdir(d):
            uri = _fs.join(d, entry)
            version = _VERSION_RE.fullmatch(entry)
            if version:
                if _fs.exists(_fs.join(uri, _MARKER)):
                    continue
            elif not entry.startswith(".tmp-"):
                continue
            age = _age_s(uri, now)
            if age is None or age < older_than:
                continue
            if version and _fs.exists(_fs.join(uri, _MARKER)):  # committed meanwhile
                continue
            gone.append(uri)
    for n in names:  # leftovers of interrupted marker writes inside committed versions
        d = _model_dir(root, n)
        for v in _version_numbers(d):
            vd = _fs.join(d, f"v{v}")
            for f in _fs.listdir(vd):
                if ".tmp-" in f and (_age_s(_fs.join(vd, f), now) or 0.0) >= older_than:
                    gone.append(_fs.join(vd, f))
    if not dry_run:
        for uri in gone:
            _fs.delete(uri)  # nothing when already gone
    return gone
