"""The model protocol: every factory gets ``features=TableFeatures``; the built-in generic models
take any declared shape; kinds are inferred from column types; user modules are shipped."""

from __future__ import annotations

import zipfile

import pytest
import torch

from sparkdl.errors import DataValidationError
from sparkdl.features import Feature, LabelInfo, TableFeatures, feature_of
from sparkdl.models import build_model, build_published
from sparkdl.schema import ColumnSpec


def _features(*feats: Feature, classes: int | None = None) -> TableFeatures:
    label = LabelInfo(name="y", task="multiclass" if classes else "regression", num_classes=classes,
                      output_dim=classes or 1)
    return TableFeatures(features=feats, label=label)


@pytest.mark.parametrize("shape, batch_shape", [((8, 8), (5, 8, 8)), ((12, 10, 3), (5, 12, 10, 3)),
                                                ((3, 12, 10), (5, 3, 12, 10)), ((1, 28, 28), (5, 1, 28, 28))])
def test_image_cnn_takes_any_declared_layout(shape, batch_shape):
    feats = _features(Feature(name="img", kind="image", type="binary", shape=shape, codec="png"), classes=4)
    model = build_model("image_cnn", features=feats, channels=4)
    out = model({"img": torch.randint(0, 256, batch_shape, dtype=torch.uint8)})
    assert out.shape == (5, 4)


def test_channels_first_and_last_see_the_same_pixels_alike():
    torch.manual_seed(0)
    last = build_model("image_cnn", channels=4, features=_features(
        Feature(name="img", kind="image", type="binary", shape=(6, 7, 3), codec="png"), classes=2))
    first = build_model("image_cnn", channels=4, features=_features(
        Feature(name="img", kind="image", type="binary", shape=(3, 6, 7), codec="png"), classes=2))
    first.load_state_dict(last.state_dict())
    x = torch.randint(0, 256, (2, 6, 7, 3), dtype=torch.uint8)
    torch.testing.assert_close(last({"img": x}), first({"img": x.permute(0, 3, 1, 2)}))


def test_tabular_mlp_reads_numeric_vector_categorical_and_tokens_columns():
    feats = _features(Feature(name="a", kind="numeric", type="float32"),
                      Feature(name="v", kind="vector", type="array<float32>", shape=(2, 3)),
                      Feature(name="c", kind="categorical", type="int32", cardinality=7),
                      Feature(name="t", kind="tokens", type="array<int32>", cardinality=20, shape=(5,)), classes=3)
    model = build_model("tabular_mlp", features=feats)
    batch = {"a": torch.randn(4), "v": torch.randn(4, 2, 3), "c": torch.randint(0, 7, (4,)),
             "t": torch.randint(0, 20, (4, 5))}
    assert model(batch).shape == (4, 3) and model.input_columns == ["a", "v", "c", "t"]
    with pytest.raises(ValueError, match="use model='image_cnn'"):
        build_model("tabular_mlp", features=_features(Feature(name="i", kind="image", type="binary", shape=(4, 4))))


def test_token_encoder_ignores_padding_and_survives_all_padding_rows():
    torch.manual_seed(0)
    feats = _features(Feature(name="t", kind="tokens", type="array<int32>", cardinality=30, shape=(6,)))
    model = build_model("token_encoder", features=feats, dim=16, heads=2).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    out = model({"t": ids})
    assert out.shape == (2, 1) and torch.isfinite(out).all()
    bag = build_model("token_encoder", features=feats, dim=16, layers=0).eval()
    a, b = bag({"t": torch.tensor([[3, 4, 0, 0, 0, 0]])}), bag({"t": torch.tensor([[3, 4, 0, 0, 0, 0]])})
    torch.testing.assert_close(a, b)


def test_one_column_models_name_the_columns_they_cannot_use():
    feats = _features(Feature(name="img", kind="image", type="binary", shape=(8, 8)),
                      Feature(name="x", kind="numeric", type="float32"))
    with pytest.raises(ValueError, match=r"reads one image column.*feature_columns="):
        build_model("image_cnn", features=feats)
    assert build_model("image_cnn", features=feats, column="img").input_columns == ["img"]


def test_a_user_factory_gets_the_features_and_one_without_the_parameter_is_called_plainly(tmp_path, monkeypatch):
    (tmp_path / "sparkdl_user_models.py").write_text(
        "import torch\n"
        "def with_features(features, width=3):\n"
        "    return torch.nn.Linear(len(features.names) * width, features.output_dim)\n"
        "def fixed():\n"
        "    return torch.nn.Linear(2, 1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    feats = _features(Feature(name="a", kind="numeric", type="float32"), classes=5)
    assert build_model("sparkdl_user_models:with_features", features=feats, width=2).weight.shape == (5, 2)
    assert build_model("sparkdl_user_models:fixed", features=feats).weight.shape == (1, 2)


def test_features_round_trip_as_json_and_rebuild_the_published_model():
    feats = _features(Feature(name="img", kind="image", type="binary", shape=(3, 6, 6), codec="png"), classes=3)
    import json

    data = json.loads(json.dumps(feats.to_dict()))
    assert TableFeatures.from_dict(data) == feats
    torch.manual_seed(0)
    a = build_model("image_cnn", features=feats)
    torch.manual_seed(0)
    b = build_published({"factory": "image_cnn", "kwargs": {}, "features": data})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_digits_cnn_is_the_generic_image_cnn_for_8x8_grey_digits():
    torch.manual_seed(0)
    alias = build_model("digits_cnn")
    torch.manual_seed(0)
    generic = build_model("image_cnn", features=_features(
        Feature(name="image", kind="image", type="binary", shape=(8, 8), codec="png"), classes=10))
    assert type(alias) is type(generic)
    for (k, x), (_, y) in zip(alias.state_dict().items(), generic.state_dict().items()):
        assert torch.equal(x, y), k


@pytest.mark.parametrize("column, kind", [
    (ColumnSpec(name="f", type="float32"), "numeric"),
    (ColumnSpec(name="i", type="int64"), "numeric"),
    (ColumnSpec(name="c", type="int32", cardinality=9), "categorical"),
    (ColumnSpec(name="p", type="binary", codec="jpeg", shape=(4, 4, 3)), "image"),
    (ColumnSpec(name="v", type="array<float32>"), "vector"),
    (ColumnSpec(name="t", type="array<int32>", cardinality=100), "tokens"),
    (ColumnSpec(name="n", type="array<int64>"), "vector"),
    (ColumnSpec(name="k", type="float32", kind="numeric"), "numeric"),
])
def test_kinds_are_inferred_from_types(column, kind):
    assert feature_of(column, table="t").kind == kind


@pytest.mark.parametrize("column, message", [
    (ColumnSpec(name="city", type="string"), r"'city' of t holds string.*encode it in the ETL"),
    (ColumnSpec(name="when", type="timestamp"), r"'when' of t holds timestamp.*convert it in the ETL"),
    (ColumnSpec(name="blob", type="binary"), r"'blob' of t holds binary"),
    (ColumnSpec(name="c", type="int32", kind="categorical"), r"'c' of t is categorical but declares no cardinality"),
    (ColumnSpec(name="y", type="int32", kind="binary"), r"'y' of t has kind 'binary', a label kind"),
])
def test_columns_no_model_can_take_are_named_with_the_fix(column, message):
    with pytest.raises(DataValidationError, match=message):
        feature_of(column, table="t")


def test_a_local_package_is_zipped_for_the_executors(tmp_path, monkeypatch):
    from sparkdl.models import _shippable

    pkg = tmp_path / "sparkdl_user_pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "nets.py").write_text("def factory(features):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _shippable("sparkdl_user_pkg.sub.nets")
    assert path.endswith(".zip")
    with zipfile.ZipFile(path) as z:
        assert set(z.namelist()) == {"sparkdl_user_pkg/__init__.py", "sparkdl_user_pkg/sub/__init__.py",
                                     "sparkdl_user_pkg/sub/nets.py"}
    assert _shippable("torch.nn") is None  # installed: executors have it from their own environment
