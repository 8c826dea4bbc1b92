"""Models: the registry, the built-in generic models, and shipping a user's model module.

One protocol for every model (built-in or the user's ``module:factory``): the factory is called
as ``factory(features=TableFeatures, **model_kwargs)`` (``sparkdl.features``: each feature
column's name, kind, type, cardinality, shape and codec, the label's task and ``output_dim``,
the table's preprocessing spec). A factory without a ``features`` parameter is called without
it (a model with fixed inputs). The module's ``forward(batch)`` receives the batch dict (every
feature column, as the loader decodes it) and returns ``[n]``/``[n, 1]`` or ``[n, output_dim]``
outputs (logits for classification; see ``sparkdl.tasks``). No code looks at a model's name.

Built-in models, for any table whose columns carry kinds (the ETL sets them; see
``sparkdl.features`` for the inference on other tables):

- ``tabular_mlp``: numeric and vector columns, one embedding per categorical column, a mean
  embedding bag per tokens column, then an MLP.
- ``image_cnn``: one image column of any declared shape ([H, W], [H, W, C] or [C, H, W]), two
  convolutions, adaptive pooling to 4x4, an MLP head.
- ``token_encoder``: one tokens column (0 = padding); a small transformer encoder with learned
  positions and masked mean pooling (``layers=0``: an embedding bag).

``flights_mlp`` and ``digits_cnn`` are aliases of ``tabular_mlp`` and ``image_cnn``
(``digits_cnn`` without ``features=`` builds the 8x8 grey, 10-class network, for tests).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sysconfig
import tempfile
import zipfile
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from sparkdl.features import Feature, LabelInfo, TableFeatures
from sparkdl.session import ship_py_files

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

__all__ = ["register_model", "build_model", "registered_models", "build_published", "ship_to_executors",
           "TabularMLP", "ImageCNN", "TokenEncoder"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        return factory

    return deco


def registered_models() -> list[str]:
    return sorted(_REGISTRY)


def _factory(name: str) -> Callable[..., nn.Module]:
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"model {name!r}: cannot import {attr} from {mod}: {e}") from e
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {registered_models()} (or give 'module:factory')")
    return _REGISTRY[name]


def _takes_features(factory: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "features" or p.kind == p.VAR_KEYWORD for p in params)


def build_model(name: str | Callable[..., nn.Module], *, features: TableFeatures | None = None,
                **kwargs: Any) -> nn.Module:
    """A registered name, ``package.module:factory`` or a factory itself, called with ``features=``
    (when given and the factory takes it) and ``kwargs``."""
    factory = name if callable(name) else _factory(name)
    if features is not None and _takes_features(factory):
        return factory(features=features, **kwargs)
    return factory(**kwargs)


def build_published(model_config: dict[str, Any], *, spec: dict[str, Any] | None = None,
                    factory: str | Callable[..., nn.Module] | None = None) -> nn.Module:
    """The (untrained) module a published ``model_config.json`` describes; ``spec`` is the
    version's preprocessing spec (published once, as preprocessing.json). ``factory``: what the
    registry resolved ``model_config["factory"]`` to after its trust check (sparkdl.registry)."""
    feats = model_config.get("features")
    features = TableFeatures.from_dict({**feats, "spec": spec}) if feats else None
    kwargs = model_config.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ValueError("model_config.json 'kwargs' is not an object; republish the model")
    return build_model(factory or model_config["factory"], features=features, **kwargs)


# ---------------------------------------------------------------------------------------
# Built-in models
# ---------------------------------------------------------------------------------------
def _need_features(model: str, features: TableFeatures | None) -> TableFeatures:
    if features is None:
        raise ValueError(f"model {model!r} is built from the table's features: build it with features= "
                         "(sparkdl.features.TableFeatures), as fit does")
    return features


def _mlp(width: int, hidden: tuple[int, ...], dropout: float, out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


def _size(f: Feature) -> int:
    if not f.shape:
        raise ValueError(f"column {f.name!r} ({f.kind}) has no declared shape; declare sparkdl.shape in the schema")
    n = 1
    for d in f.shape:
        n *= d
    return n


class TabularMLP(nn.Module):
    """Numeric and vector columns, an embedding per categorical column and a mean embedding bag
    per tokens column, concatenated into an MLP."""

    def __init__(self, features: TableFeatures, embed_dim: int = 8, hidden: tuple[int, ...] = (64, 32),
                 dropout: float = 0.1) -> None:
        super().__init__()
        images = features.of_kind("image")
        if images:
            raise ValueError(f"tabular_mlp does not read images (column {images[0].name!r}); use model='image_cnn', "
                             "or leave the column out with feature_columns=")
        self.numeric = [f.name for f in features.of_kind("numeric")]
        self.vectors = {f.name: _size(f) for f in features.of_kind("vector")}
        self.embeddings = nn.ModuleDict({f.name: nn.Embedding(int(f.cardinality), embed_dim)
                                         for f in features.of_kind("categorical")})
        self.bags = nn.ModuleDict({f.name: nn.EmbeddingBag(int(f.cardinality), embed_dim, mode="mean",
                                                           padding_idx=0) for f in features.of_kind("tokens")})
        width = len(self.numeric) + sum(self.vectors.values()) + embed_dim * (len(self.embeddings) + len(self.bags))
        if width == 0:
            raise ValueError("tabular_mlp needs at least one numeric, vector, categorical or tokens feature column")
        self.mlp = _mlp(width, tuple(hidden), dropout, features.output_dim)

    @property
    def input_columns(self) -> list[str]:
        return self.numeric + list(self.vectors) + list(self.embeddings) + list(self.bags)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [torch.stack([batch[c].float() for c in self.numeric], dim=1)] if self.numeric else []
        parts += [batch[c].float().reshape(len(batch[c]), -1) for c in self.vectors]
        parts += [emb(batch[c].long()) for c, emb in self.embeddings.items()]
        parts += [bag(batch[c].long().reshape(len(batch[c]), -1)) for c, bag in self.bags.items()]
        return self.mlp(torch.cat(parts, dim=1))


def _only(features: TableFeatures, kind: str, model: str, column: str | None) -> Feature:
    cols = [f for f in features.of_kind(kind) if column in (None, f.name)]
    others = [f.name for f in features.features if f.kind != kind]
    if len(cols) != 1 or (others and column is None):
        raise ValueError(f"model {model!r} reads one {kind} column, but the feature columns are "
                         f"{[(f.name, f.kind) for f in features.features]}; pass feature_columns=[<the {kind} column>]"
                         f" (or model_kwargs column=...)")
    return cols[0]


class ImageCNN(nn.Module):
    """One image column (uint8, scaled to [0, 1] inside): two 3x3 convolutions, 2x2 max pooling,
    adaptive average pooling to 4x4, an MLP head. Any declared shape: [H, W] (grey), [H, W, C]
    (channels last) or [C, H, W] (channels first)."""

    def __init__(self, column: str, shape: tuple[int, ...], output_dim: int, channels: int = 32,
                 hidden: int = 64) -> None:
        super().__init__()
        self.column = column
        shape = tuple(shape)
        if len(shape) == 2:
            in_ch, self.layout = 1, "hw"
        elif len(shape) == 3 and shape[-1] in (1, 3, 4):
            in_ch, self.layout = shape[-1], "hwc"
        elif len(shape) == 3 and shape[0] in (1, 3, 4):
            in_ch, self.layout = shape[0], "chw"
        else:
            raise ValueError(f"image column {column!r} has shape {list(shape)}; image_cnn takes [H, W], [H, W, C] "
                             "or [C, H, W] with C = 1, 3 or 4")
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(channels * 16, hidden), nn.ReLU(),
            nn.Linear(hidden, output_dim),
        )

    @property
    def input_columns(self) -> list[str]:
        return [self.column]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch[self.column].float().div(255.0)
        if self.layout == "hw":
            x = x.unsqueeze(1)
        elif self.layout == "hwc":
            x = x.permute(0, 3, 1, 2)
        return self.net(x)


class TokenEncoder(nn.Module):
    """One tokens column (ids, 0 = padding): token + position embeddings, ``layers`` transformer
    encoder layers, mean over the non-padding positions, a linear head (``layers=0``: embedding bag)."""

    def __init__(self, column: str, cardinality: int, length: int, output_dim: int, dim: int = 32, heads: int = 4,
                 layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.column = column
        self.tokens = nn.Embedding(cardinality, dim, padding_idx=0)
        self.positions = nn.Embedding(length, dim)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=dropout, batch_first=True),
            layers, enable_nested_tensor=False) if layers else None
        self.head = nn.Linear(dim, output_dim)

    @property
    def input_columns(self) -> list[str]:
        return [self.column]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = batch[self.column].long().reshape(len(batch[self.column]), -1)
        pad = ids == 0
        pad = pad & ~pad.all(1, keepdim=True)  # an all-padding row attends to its padding, not to nothing
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        if self.encoder is not None:
            x = self.encoder(x, src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).to(x.dtype)
        return self.head((x * keep).sum(1) / keep.sum(1).clamp_min(1))


@register_model("tabular_mlp")
def tabular_mlp(*, features: TableFeatures | None = None, **kwargs: Any) -> nn.Module:
    return TabularMLP(_need_features("tabular_mlp", features), **kwargs)


@register_model("image_cnn")
def image_cnn(*, features: TableFeatures | None = None, column: str | None = None, **kwargs: Any) -> nn.Module:
    f = _only(_need_features("image_cnn", features), "image", "image_cnn", column)
    if not f.shape:
        raise ValueError(f"image column {f.name!r} has no declared shape; declare sparkdl.shape in the schema")
    return ImageCNN(f.name, f.shape, features.output_dim, **kwargs)


@register_model("token_encoder")
def token_encoder(*, features: TableFeatures | None = None, column: str | None = None, **kwargs: Any) -> nn.Module:
    f = _only(_need_features("token_encoder", features), "tokens", "token_encoder", column)
    return TokenEncoder(f.name, int(f.cardinality), _size(f), features.output_dim, **kwargs)


register_model("flights_mlp")(tabular_mlp)


@register_model("digits_cnn")
def digits_cnn(*, features: TableFeatures | None = None, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    if features is None:
        features = TableFeatures(
            features=(Feature(name="image", kind="image", type="binary", shape=(8, 8), codec="png"),),
            label=LabelInfo(name="label", task="multiclass", num_classes=num_classes, output_dim=num_classes))
    return image_cnn(features=features, **kwargs)


# ---------------------------------------------------------------------------------------
# A user's module on the executors
# ---------------------------------------------------------------------------------------
def _installed(path: str) -> bool:
    """Whether ``path`` lies in this interpreter's installation (stdlib or site-packages)."""
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    real = os.path.realpath(path)
    return any(real.startswith(os.path.realpath(r) + os.sep) for r in roots)


def _shippable(module: str) -> str | None:
    """A file to addPyFile so that executors can import ``module``: the .py file of a top-level
    module, or a zip of its top-level package; None when it is installed or has no file."""
    top = importlib.import_module(module.split(".")[0])
    path = getattr(top, "__file__", None)
    if not path or _installed(path) or top.__name__ == "sparkdl":
        return None
    if os.path.basename(path) != "__init__.py":
        return path
    pkg_dir = os.path.dirname(path)
    digest = hashlib.sha256()
    files = []
    for base, dirs, names in os.walk(pkg_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for n in sorted(names):
            if n.endswith(".py"):
                full = os.path.join(base, n)
                files.append(full)
                digest.update(full.encode())
                with open(full, "rb") as fh:
                    digest.update(fh.read())
    out = os.path.join(tempfile.gettempdir(), f"sparkdl-ship-{top.__name__}-{digest.hexdigest()[:12]}.zip")
    if not os.path.exists(out):
        tmp = out + f".{os.getpid()}"
        with zipfile.ZipFile(tmp, "w") as z:
            for full in files:
                z.write(full, os.path.relpath(full, os.path.dirname(pkg_dir)))
        os.replace(tmp, out)
    return out


def ship_to_executors(spark: "SparkSession", specs: list[str], *, what: str) -> None:
    """Make the modules of ``specs`` ('module:attr') importable on the executors, then prove it.

    A module that is a local file or package outside this interpreter's installation is shipped
    with ``SparkContext.addPyFile``; then one tiny Spark job imports every module on an executor.
    A failure raises RuntimeError naming the module and the fix, before anything is launched."""
    modules = sorted({s.partition(":")[0] for s in specs if s and ":" in s})
    modules = [m for m in modules if m.split(".")[0] != "sparkdl"]
    if not modules:
        return
    paths = []
    for m in modules:
        try:
            path = _shippable(m)
        except ImportError:
            path = None  # the probe below names it
        if path is not None:
            paths.append(path)
    ship_py_files(spark, paths)

    failed = _probe_executor(spark, modules)
    if failed:
        raise RuntimeError(
            f"the executors cannot import the {what} module ({'; '.join(failed)}). Install it on every executor "
            "(pip), or ship it: spark-submit --py-files <module.py or package.zip>, or "
            "spark.sparkContext.addPyFile(<path>) (Spark Connect: spark.addArtifacts(<path>, pyfile=True)) before "
            "calling sparkdl (a module defined in a notebook cell "
            "or without a file cannot be shipped: put it in a .py file)")


def _import_failures(modules: list[str]) -> list[str]:
    """'module: error' for each of ``modules`` this Python cannot import."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as e:  # any import failure is reported, not raised, to name the module
            failed.append(f"{name}: {type(e).__name__}: {e}")
    return failed


def _probe_executor(spark: "SparkSession", modules: list[str]) -> list[str]:
    """``_import_failures`` run in one task on an executor (where the shipped files land)."""
    import pyarrow as pa

    def probe(batches: Any) -> Any:
        for _ in batches:
            pass
        yield pa.RecordBatch.from_arrays([pa.array(_import_failures(modules), pa.string())], names=["error"])

    return [r["error"] for r in spark.range(1, numPartitions=1).mapInArrow(probe, "error string").collect()]
