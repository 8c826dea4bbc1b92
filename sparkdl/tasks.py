"""Learning tasks: each one owns its loss, its validation metrics, the rules its labels must
follow, the post-processing of model outputs and the columns of its predictions, so the training
loop, the metrics, ``fit``, the models and ``predict`` hold no per-task branches.

What a model returns, per task (logits for the classification tasks):

============  ==============  ==================  =====================================================
task          model output    label               predictions columns
============  ==============  ==================  =====================================================
binary        [n] or [n, 1]   0/1 (int or bool)   prediction int (score >= 0.5), score float (P(1))
multiclass    [n, C]          class id in [0, C)  prediction int, score float (P(prediction)),
                                                  probabilities array<float> (C)
multilabel    [n, C]          0/1 vector of C     prediction array<int> (P >= 0.5), probabilities array<float>
regression    [n] or [n, 1]   a finite number     prediction float
============  ==============  ==================  =====================================================

Losses: binary/multilabel binary cross-entropy, multiclass cross-entropy, regression ``mse``
(default), ``huber`` (delta 1) or ``mae``; ``loss="module:function"`` replaces the built-in one:
``function(outputs, labels)`` returns one loss per row (shape [n]) or a scalar (then sample
weights cannot apply). With a weight column, a batch's loss is ``sum(w * loss_row) / n``: the mean
of weighted row losses, so 2 ranks x b rows give the same gradient as 1 rank x 2b rows.

Metrics are sums over the validation rows that every rank all-reduces (loss, accuracy, top-k,
confusion matrices, squared/absolute errors), then finished once; weighted by the weight column
when there is one. The binary AUC is exact: it needs every (score, label) pair in one place, so
the ranks *gather* theirs to rank 0 only (3 float64 per row), which computes the Mann-Whitney
statistic with ties counted half, and broadcasts the one number back.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F

__all__ = ["Task", "TASKS", "REGRESSION_LOSSES", "make_task", "load_function", "exact_auc"]

TASKS = ("binary", "multiclass", "multilabel", "regression")
REGRESSION_LOSSES = ("mse", "huber", "mae")


def load_function(spec: str, *, what: str) -> Callable[..., Any]:
    """``module:function`` imported; a ValueError naming ``what`` and the fix otherwise."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"{what}={spec!r} must be 'module:function', e.g. 'mypkg.losses:focal'")
    try:
        fn = getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{what}={spec!r}: cannot import {attr} from {mod}: {e}; make the module importable "
                         "(pip install it, or put it on PYTHONPATH)") from e
    if not callable(fn):
        raise ValueError(f"{what}={spec!r}: {mod}.{attr} is not callable")
    return fn


def exact_auc(score: np.ndarray, label: np.ndarray, weight: np.ndarray | None = None) -> float:
    """ROC AUC of ``score`` for ``label`` (0/1), with tied scores counted half; NaN without both classes."""
    w = np.ones_like(score, dtype=np.float64) if weight is None else weight.astype(np.float64)
    values, group = np.unique(score, return_inverse=True)
    pos = np.bincount(group, weights=w * label, minlength=len(values))
    neg = np.bincount(group, weights=w * (1 - label), minlength=len(values))
    total_pos, total_neg = pos.sum(), neg.sum()
    if total_pos <= 0 or total_neg <= 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (total_pos * total_neg))


def _list_array(values: np.ndarray, pa_type: pa.DataType) -> pa.Array:
    """[n, C] numpy values as an Arrow list<...> column (what Spark reads as array<...>)."""
    n, c = values.shape
    offsets = pa.array(np.arange(0, (n + 1) * c, c, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=pa_type))


class Task:
    """One learning task (see the module docstring); build one with ``make_task``."""

    name = ""
    output_columns: tuple[tuple[str, pa.DataType], ...] = ()
    """(name, Arrow type) of the predictions columns, in order."""
    label_rule = ""
    """The labels' rule, for error messages."""
    needs_classes = False
    """Whether the task needs num_classes (multiclass, multilabel)."""

    def __init__(self, *, num_classes: int | None = None, loss: str | None = None, top_k: int = 5) -> None:
        self.num_classes = num_classes
        self.loss_spec = loss
        self.top_k = top_k
        self._custom = load_function(loss, what="loss") if loss and ":" in loss else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes}, loss={self.loss_spec!r})"

    # ----- shapes -----
    @property
    def output_dim(self) -> int:
        """Outputs per row the model must return (1 = a scalar per row)."""
        return 1

    def outputs(self, out: torch.Tensor) -> torch.Tensor:
        """The model's output in this task's shape ([n] or [n, C]), as float."""
        out = out.float()
        return out.reshape(out.shape[0]) if self.output_dim == 1 else out.reshape(out.shape[0], self.output_dim)

    # ----- loss -----
    def _loss_rows(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, out: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's loss (a scalar): the mean row loss, or ``sum(w * row) / n`` with weights."""
        out = self.outputs(out)
        rows = self._custom(out, y) if self._custom is not None else self._loss_rows(out, y)
        if rows.dim() == 0:
            if weight is not None:
                raise ValueError(f"loss={self.loss_spec!r} returns a scalar, so weight_column cannot weight its "
                                 "rows; return one loss per row (shape [n]) or drop weight_column")
            return rows
        rows = rows.reshape(len(y), -1).mean(1) if rows.dim() > 1 else rows
        return (rows * weight.to(rows.dtype)).sum() / len(rows) if weight is not None else rows.mean()

    # ----- validation metrics -----
    def metric_sums(self, out: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Float64 sums over one batch of kept validation rows (all-reduced across ranks)."""
        raise NotImplementedError

    def metrics(self, sums: torch.Tensor) -> dict[str, float]:
        """The metrics of the all-reduced sums."""
        raise NotImplementedError

    def _common_sums(self, out: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> list[torch.Tensor]:
        """[sum of weights, sum of weighted row losses]."""
        if self._custom is None:
            loss = (self._loss_rows(out, y).double() * w).sum()
        else:  # a scalar custom loss can only be weighted by the batch's total weight
            rows = self._custom(out, y).double()
            loss = (rows.reshape(len(y), -1).mean(1) * w).sum() if rows.dim() else rows * w.sum()
        return [w.sum(), loss]

    gathers_rows = False
    """Whether some metric needs every validation row on rank 0 (``gather_rows``/``gathered_metrics``)."""

    def gather_rows(self, out: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def gathered_metrics(self, rows: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    # ----- labels -----
    def label_problem(self, stats: dict[str, Any]) -> str | None:
        """What is wrong with a label column, from its statistics (``sparkdl.features``), or None."""
        raise NotImplementedError

    def bad_labels(self, arr: pa.Array) -> pa.Array:
        """Boolean mask of the label values that break ``label_rule`` (nulls included)."""
        raise NotImplementedError

    # ----- predictions -----
    def predictions(self, out: torch.Tensor) -> dict[str, pa.Array]:
        """The predictions columns of a batch of model outputs."""
        raise NotImplementedError

    def spark_metrics(self, df: Any, label: str) -> dict[str, float]:
        """The task's metrics over a Spark DataFrame of predictions (its prediction columns and
        ``label``), computed exactly by Spark aggregations (no rows collected); keys as in
        training without the ``val_`` prefix, plus ``rows``."""
        raise NotImplementedError


class _Binary(Task):
    name = "binary"
    output_columns = (("prediction", pa.int32()), ("score", pa.float32()))
    label_rule = "binary labels must be 0 or 1"

    def _loss_rows(self, out, y):
        return F.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="none")

    def metric_sums(self, out, y, w):
        yf = y.double()
        logloss = F.binary_cross_entropy_with_logits(out.double(), yf, reduction="none")
        correct = ((out > 0).double() == yf).double()
        return torch.stack([*self._common_sums(out, y, w), (correct * w).sum(), (logloss * w).sum()])

    def metrics(self, s):
        return {"val_loss": float(s[1] / s[0]), "val_accuracy": float(s[2] / s[0]),
                "val_log_loss": float(s[3] / s[0])}

    gathers_rows = True

    def gather_rows(self, out, y, w):
        return torch.stack([torch.sigmoid(out.double()), y.double(), w.double()], 1)

    def gathered_metrics(self, rows):
        return {"val_auc": exact_auc(rows[:, 0], rows[:, 1], rows[:, 2])}

    def label_problem(self, st):
        if st["integral"] and st["min"] >= 0 and st["max"] <= 1:
            return None
        return self.label_rule

    def bad_labels(self, arr):
        return pc.invert(pc.fill_null(pc.is_in(arr.cast(pa.float64()), pa.array([0.0, 1.0])), False))

    def predictions(self, out):
        score = torch.sigmoid(self.outputs(out)).cpu().numpy().astype(np.float32)
        return {"prediction": pa.array((score >= 0.5).astype(np.int32)), "score": pa.array(score)}

    def spark_metrics(self, df, label):
        from pyspark.sql import Window
        from pyspark.sql import functions as S

        y, p = S.col(label).cast("double"), S.least(S.greatest(S.col("score").cast("double"), S.lit(1e-7)),
                                                    S.lit(1 - 1e-7))
        row = df.agg(S.count("*").alias("rows"), S.avg((S.col("prediction") == y).cast("double")).alias("acc"),
                     S.avg(-(y * S.log(p) + (1 - y) * S.log(1 - p))).alias("ll")).first()
        # Exact AUC: positives and negatives per distinct score, then each positive counts the
        # negatives below it (ties half), over the distinct scores in order.
        per_score = df.groupBy(S.col("score").alias("s")).agg(S.sum(y).alias("pos"), S.sum(1 - y).alias("neg"))
        below = S.sum("neg").over(Window.orderBy("s").rowsBetween(Window.unboundedPreceding, -1))
        auc = per_score.select("pos", "neg", S.coalesce(below, S.lit(0.0)).alias("below")).agg(
            S.sum(S.col("pos") * (S.col("below") + 0.5 * S.col("neg"))).alias("num"), S.sum("pos").alias("P"),
            S.sum("neg").alias("N")).first()
        return {"rows": int(row["rows"]), "accuracy": float(row["acc"]), "log_loss": float(row["ll"]),
                "auc": float(auc["num"] / (auc["P"] * auc["N"])) if auc["P"] and auc["N"] else float("nan")}


class _Multiclass(Task):
    name = "multiclass"
    needs_classes = True
    output_columns = (("prediction", pa.int32()), ("score", pa.float32()),
                      ("probabilities", pa.list_(pa.float32())))

    @property
    def label_rule(self) -> str:  # type: ignore[override]
        return f"multiclass labels must be class ids 0..{self.num_classes - 1} (num_classes={self.num_classes})"

    @property
    def output_dim(self) -> int:
        return int(self.num_classes)

    @property
    def _k(self) -> int:
        return min(self.top_k, self.output_dim)

    def _loss_rows(self, out, y):
        return F.cross_entropy(out, y.long(), reduction="none")

    def metric_sums(self, out, y, w):
        c = self.output_dim
        y = y.long()
        pred = out.argmax(-1)
        topk = (out.topk(self._k, dim=-1).indices == y[:, None]).any(-1).double()
        confusion = torch.zeros(c * c, dtype=torch.float64, device=out.device)
        confusion.index_add_(0, y * c + pred, w.double())
        return torch.cat([torch.stack([*self._common_sums(out, y, w), ((pred == y).double() * w).sum(),
                                       (topk * w).sum()]), confusion])

    def metrics(self, s):
        c = self.output_dim
        confusion = s[4:].reshape(c, c)
        tp = confusion.diag()
        denom = confusion.sum(0) + confusion.sum(1)  # 2tp + fp + fn
        seen = denom > 0  # classes absent from both labels and predictions do not count
        f1 = (2 * tp[seen] / denom[seen]).mean() if seen.any() else torch.tensor(float("nan"))
        out = {"val_loss": float(s[1] / s[0]), "val_accuracy": float(s[2] / s[0]), "val_macro_f1": float(f1)}
        if self._k < c:
            out[f"val_top{self._k}_accuracy"] = float(s[3] / s[0])
        return out

    def label_problem(self, st):
        if st["integral"] and st["min"] >= 0 and st["max"] < self.num_classes:
            return None
        return self.label_rule

    def bad_labels(self, arr):
        v = arr.cast(pa.float64())
        ok = pc.and_(pc.and_(pc.greater_equal(v, 0), pc.less(v, self.num_classes)), pc.equal(pc.floor(v), v))
        return pc.invert(pc.fill_null(ok, False))

    def predictions(self, out):
        prob = torch.softmax(self.outputs(out), -1)
        score, pred = prob.max(-1)
        return {"prediction": pa.array(pred.cpu().numpy().astype(np.int32)),
                "score": pa.array(score.cpu().numpy().astype(np.float32)),
                "probabilities": _list_array(prob.cpu().numpy().astype(np.float32), pa.float32())}

    def spark_metrics(self, df, label):
        from pyspark.sql import functions as S

        y = S.col(label).cast("int")
        mine = S.element_at("probabilities", y + 1)
        higher = S.size(S.filter("probabilities", lambda q: q > mine))
        row = df.agg(S.count("*").alias("rows"), S.avg((S.col("prediction") == y).cast("double")).alias("acc"),
                     S.avg((higher < self._k).cast("double")).alias("topk"),
                     S.avg(-S.log(S.greatest(mine.cast("double"), S.lit(1e-7)))).alias("ll")).first()
        c = self.output_dim
        confusion = torch.zeros(c, c, dtype=torch.float64)
        for r in df.groupBy(y.alias("y"), S.col("prediction").alias("p")).count().collect():  # <= C*C rows
            confusion[r["y"], r["p"]] = r["count"]
        tp, denom = confusion.diag(), confusion.sum(0) + confusion.sum(1)
        seen = denom > 0
        out = {"rows": int(row["rows"]), "accuracy": float(row["acc"]), "log_loss": float(row["ll"]),
               "macro_f1": float((2 * tp[seen] / denom[seen]).mean()) if seen.any() else float("nan")}
        if self._k < c:
            out[f"top{self._k}_accuracy"] = float(row["topk"])
        return out


class _Multilabel(Task):
    name = "multilabel"
    needs_classes = True
    output_columns = (("prediction", pa.list_(pa.int32())), ("probabilities", pa.list_(pa.float32())))

    @property
    def label_rule(self) -> str:  # type: ignore[override]
        return f"multilabel labels must be arrays of {self.num_classes} values, each 0 or 1"

    @property
    def output_dim(self) -> int:
        return int(self.num_classes)

    def _loss_rows(self, out, y):
        return F.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="none").mean(-1)

    def metric_sums(self, out, y, w):
        y = y.reshape(out.shape).double()
        pred = (out > 0).double()
        wc = w.double()[:, None]
        tp, fp, fn = (pred * y * wc).sum(0), (pred * (1 - y) * wc).sum(0), ((1 - pred) * y * wc).sum(0)
        exact = (pred == y).all(-1).double()
        per_label = (pred == y).double().mean(-1)
        return torch.cat([torch.stack([*self._common_sums(out, y, w), (exact * w).sum(), (per_label * w).sum()]),
                          tp, fp, fn])

    def metrics(self, s):
        c = self.output_dim
        tp, fp, fn = s[4:4 + c], s[4 + c:4 + 2 * c], s[4 + 2 * c:]
        denom = 2 * tp + fp + fn
        seen = denom > 0
        f1 = (2 * tp[seen] / denom[seen]).mean() if seen.any() else torch.tensor(float("nan"))
        return {"val_loss": float(s[1] / s[0]), "val_subset_accuracy": float(s[2] / s[0]),
                "val_accuracy": float(s[3] / s[0]), "val_macro_f1": float(f1)}

    def label_problem(self, st):
        if st["min_length"] != self.num_classes or st["max_length"] != self.num_classes:
            return self.label_rule
        if st["integral"] and st["min"] >= 0 and st["max"] <= 1:
            return None
        return self.label_rule

    def bad_labels(self, arr):
        lengths = pc.fill_null(pc.list_value_length(arr), -1)
        flat = pc.list_flatten(arr).cast(pa.float64())
        bad_values = pc.invert(pc.fill_null(pc.is_in(flat, pa.array([0.0, 1.0])), False))
        parents = pc.list_parent_indices(arr)
        bad_rows = np.zeros(len(arr), dtype=bool)
        bad_rows[np.asarray(pc.filter(parents, bad_values))] = True
        return pc.or_(pc.not_equal(lengths, self.num_classes), pa.array(bad_rows))

    def predictions(self, out):
        prob = torch.sigmoid(self.outputs(out)).cpu().numpy().astype(np.float32)
        return {"prediction": _list_array((prob >= 0.5).astype(np.int32), pa.int32()),
                "probabilities": _list_array(prob, pa.float32())}

    def spark_metrics(self, df, label):
        from pyspark.sql import functions as S

        pairs = df.select(S.posexplode(S.arrays_zip(S.col("prediction").alias("p"),
                                                    S.col(label).cast("array<int>").alias("y"))))
        per = pairs.groupBy("pos").agg(
            S.sum((S.col("col.p") * S.col("col.y")).cast("double")).alias("tp"),
            S.sum((S.col("col.p") * (1 - S.col("col.y"))).cast("double")).alias("fp"),
            S.sum(((1 - S.col("col.p")) * S.col("col.y")).cast("double")).alias("fn"),
            S.avg((S.col("col.p") == S.col("col.y")).cast("double")).alias("acc")).collect()  # one row per label
        row = df.agg(S.count("*").alias("rows"),
                     S.avg((S.col("prediction") == S.col(label).cast("array<int>")).cast("double")).alias("subset")
                     ).first()
        f1 = [2 * r["tp"] / (2 * r["tp"] + r["fp"] + r["fn"]) for r in per if 2 * r["tp"] + r["fp"] + r["fn"] > 0]
        return {"rows": int(row["rows"]), "subset_accuracy": float(row["subset"]),
                "accuracy": float(np.mean([r["acc"] for r in per])) if per else float("nan"),
                "macro_f1": float(np.mean(f1)) if f1 else float("nan")}


class _Regression(Task):
    name = "regression"
    output_columns = (("prediction", pa.float32()),)
    label_rule = "regression targets must be finite numbers"

    def _loss_rows(self, out, y):
        y = y.to(out.dtype)
        if self.loss_spec == "huber":
            return F.huber_loss(out, y, reduction="none", delta=1.0)
        if self.loss_spec == "mae":
            return (out - y).abs()
        return (out - y) ** 2

    def metric_sums(self, out, y, w):
        y = y.double()
        err = out.double() - y
        w = w.double()
        return torch.stack([*self._common_sums(out, y, w), (err * err * w).sum(), (err.abs() * w).sum(),
                            (y * w).sum(), (y * y * w).sum()])

    def metrics(self, s):
        total = s[0]
        sst = s[5] - s[4] * s[4] / total
        return {"val_loss": float(s[1] / total), "val_rmse": float(torch.sqrt(s[2] / total)),
                "val_mae": float(s[3] / total), "val_r2": float(1 - s[2] / sst) if sst > 0 else float("nan")}

    def label_problem(self, st):
        return None if st["nonfinite"] == 0 else self.label_rule

    def bad_labels(self, arr):
        v = arr.cast(pa.float64())
        return pc.invert(pc.fill_null(pc.is_finite(v), False))

    def predictions(self, out):
        return {"prediction": pa.array(self.outputs(out).cpu().numpy().astype(np.float32))}

    def spark_metrics(self, df, label):
        from pyspark.sql import functions as S

        y, e = S.col(label).cast("double"), S.col("prediction").cast("double") - S.col(label).cast("double")
        r = df.agg(S.count("*").alias("n"), S.sum(e * e).alias("sse"), S.sum(S.abs(e)).alias("sae"),
                   S.sum(y).alias("sy"), S.sum(y * y).alias("syy")).first()
        n = r["n"]
        if not n:
            return {"rows": 0, "rmse": float("nan"), "mae": float("nan"), "r2": float("nan")}
        sst = r["syy"] - r["sy"] * r["sy"] / n
        return {"rows": int(n), "rmse": float(math.sqrt(r["sse"] / n)), "mae": float(r["sae"] / n),
                "r2": float(1 - r["sse"] / sst) if sst > 0 else float("nan")}


_TASKS: dict[str, type[Task]] = {t.name: t for t in (_Binary, _Multiclass, _Multilabel, _Regression)}


def make_task(name: str, *, num_classes: int | None = None, loss: str | None = None, top_k: int = 5) -> Task:
    """The Task called ``name`` (one of ``TASKS``); multiclass and multilabel need ``num_classes``;
    ``loss`` is a regression loss name or ``module:function``."""
    if name not in _TASKS:
        raise ValueError(f"task={name!r} is not one of {list(TASKS)}")
    cls = _TASKS[name]
    if cls.needs_classes and not (isinstance(num_classes, int) and num_classes >= 2):
        raise ValueError(f"task={name!r} needs num_classes (>= 2): declare the label column's cardinality "
                         "in the schema, or pass num_classes=")
    if loss and ":" not in loss and not (name == "regression" and loss in REGRESSION_LOSSES):
        raise ValueError(f"loss={loss!r} does not apply to task={name!r}: use one of {list(REGRESSION_LOSSES)} "
                         "for regression, or 'module:function' for a custom loss")
    return cls(num_classes=num_classes if cls.needs_classes else None, loss=loss, top_k=top_k)
