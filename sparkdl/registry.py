"""Published model versions under ``<lakehouse>/models/<name>/v<N>/``.

A version holds safetensors weights (loadable without executing pickled code), the model
config (factory + kwargs), the training config, the preprocessing spec, lineage (input tables
and versions), metrics and curves. Publishing writes a hidden temp folder, renames it to
``v<N>`` (the next free N; retried on a race) and writes ``_COMMITTED`` last: readers ignore a
version without it, so a crash leaves no partial version visible.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparkdl.errors import ModelNotFoundError
from sparkdl.lakehouse import Lakehouse

__all__ = ["ModelVersion", "publish_model", "list_versions", "get_model_version", "load_model"]

_MARKER = "_COMMITTED"


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    uri: str
    model_config: dict[str, Any]
    training_config: dict[str, Any]
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    preprocessing: dict[str, Any] | None
    created_at: float


def _model_dir(root: str, name: str) -> Path:
    return Path(Lakehouse(root).model(name))


def list_versions(root: str, name: str) -> list[int]:
    d = _model_dir(root, name)
    if not d.exists():
        return []
    return sorted(int(p.name[1:]) for p in d.iterdir()
                  if p.name.startswith("v") and p.name[1:].isdigit() and (p / _MARKER).exists())


def publish_model(root: str, name: str, *, model: torch.nn.Module, model_config: dict[str, Any],
                  training_config: dict[str, Any], lineage: dict[str, Any], metrics: dict[str, Any],
                  preprocessing: dict[str, Any] | None = None, extra_files: dict[str, str] | None = None) -> ModelVersion:
    from safetensors.torch import save_file

    if not name or "/" in name:
        raise ValueError(f"model name {name!r} must be non-empty without '/'")
    d = _model_dir(root, name)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        created = time.time()
        docs = {"model_config.json": model_config, "training_config.json": training_config,
                "lineage.json": lineage, "metrics.json": metrics, "preprocessing.json": preprocessing}
        for fname, obj in docs.items():
            (tmp / fname).write_text(json.dumps(obj, indent=2, default=str))
        for fname, src in (extra_files or {}).items():
            if Path(src).exists():
                shutil.copy(src, tmp / fname)
        for _ in range(100):
            version = (max([int(p.name[1:]) for p in d.iterdir() if p.name.startswith("v") and p.name[1:].isdigit()],
                           default=0) + 1)
            try:
                os.rename(tmp, d / f"v{version}")  # atomic; fails if another publisher took v<N>
                break
            except OSError:
                continue
        else:
            raise RuntimeError(f"could not allocate a version under {d}")
        final = d / f"v{version}"
        (final / _MARKER).write_text(json.dumps({"created_at": created}))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return get_model_version(root, name, version)


def get_model_version(root: str, name: str, version: int | None = None) -> ModelVersion:
    versions = list_versions(root, name)
    if not versions:
        models = Path(Lakehouse(root).models())
        known = sorted(p.name for p in models.iterdir()) if models.exists() else []
        raise ModelNotFoundError(f"no published model {name!r} under {models}; published models: {known}")
    v = versions[-1] if version is None else version
    if v not in versions:
        raise ModelNotFoundError(f"model {name!r} has no version {v}; published versions: {versions}")
    d = _model_dir(root, name) / f"v{v}"
    read = lambda f: json.loads((d / f).read_text())  # noqa: E731
    return ModelVersion(name=name, version=v, uri=str(d), model_config=read("model_config.json"),
                        training_config=read("training_config.json"), lineage=read("lineage.json"),
                        metrics=read("metrics.json"), preprocessing=read("preprocessing.json"),
                        created_at=read(_MARKER)["created_at"])


def load_model(root: str, name: str, version: int | None = None, *, map_location: str = "cpu"):
    """Rebuild the model from its config and load the safetensors weights: (module, ModelVersion)."""
    from safetensors.torch import load_file

    from sparkdl.models import build_model

    mv = get_model_version(root, name, version)
    model = build_model(mv.model_config["factory"], **mv.model_config.get("kwargs", {}))
    model.load_state_dict(load_file(str(Path(mv.uri) / "model.safetensors"), device=map_location))
    model.eval()
    return model, mv
