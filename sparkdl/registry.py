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
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparkdl import _fs
from sparkdl.errors import ModelNotFoundError
from sparkdl.lakehouse import Lakehouse

__all__ = ["ModelVersion", "publish_model", "list_versions", "get_model_version", "load_model"]

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
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"model name {name!r} is invalid: use letters, digits, '.', '_' and '-' only, "
                         "starting with a letter or digit")


def _version_numbers(d: str) -> list[int]:
    """Every v<N> folder, committed or not."""
    return sorted(int(m.group(1)) for m in map(_VERSION_RE.fullmatch, _fs.listdir(d)) if m)


def list_versions(root: str, name: str) -> list[int]:
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


def get_model_version(root: str, name: str, version: int | None = None) -> ModelVersion:
    versions = list_versions(root, name)
    if not versions:
        models = _models_root(root)
        known = [m for m in _fs.listdir(models) if not m.startswith(".")]
        raise ModelNotFoundError(f"no published model {name!r} under {models}; published models: {known}")
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


def load_model(root: str, name: str, version: int | None = None, *, map_location: str = "cpu"):
    """Rebuild the model from its config and load the safetensors weights: (module, ModelVersion)."""
    from safetensors.torch import load

    from sparkdl.models import build_model

    mv = get_model_version(root, name, version)
    model = build_model(mv.model_config["factory"], **mv.model_config.get("kwargs", {}))
    state = load(_fs.read_bytes(_fs.join(mv.uri, "model.safetensors")))
    model.load_state_dict(state)
    model.to(map_location)
    model.eval()
    return model, mv
