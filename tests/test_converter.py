"""cache_dataframe: a Spark DataFrame materialized once as a Delta cache table, then loaded."""

from __future__ import annotations

import os

import pytest
import torch

from sparkdl.data import LoaderConfig, cache_dataframe, clear_cache

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def source_parquet(spark, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("conv") / "src")
    (
        spark.range(0, 500, numPartitions=3)
        .selectExpr("id", "cast(id % 7 as int) as label", "array(cast(id as float), cast(id * 2 as float)) as v")
        .write.parquet(path)
    )
    return path


def test_cache_reuse_new_plan_and_delete(spark, source_parquet, tmp_path):
    root = str(tmp_path / "cache")
    df = spark.read.parquet(source_parquet).filter("label < 5")
    first = cache_dataframe(df, cache_root=root)
    assert not first.reused and first.num_rows == df.count()

    # The same query built again (new expression ids) hits the cache.
    again = cache_dataframe(spark.read.parquet(source_parquet).filter("label < 5"), cache_root=root)
    assert again.reused and again.key == first.key and again.uri == first.uri and again.version == first.version

    other = cache_dataframe(spark.read.parquet(source_parquet).filter("label < 4"), cache_root=root)
    assert not other.reused and other.key != first.key

    seen = []
    for rank in range(2):
        with first.loader(rank=rank, world_size=2, config=LoaderConfig(batch_size=32, drop_last=False)) as loader:
            for batch in loader:
                assert batch["v"].shape[1:] == (2,) and batch["v"].dtype == torch.float32
                torch.testing.assert_close(batch["v"][:, 1], batch["id"].float() * 2)
                seen += batch["id"].tolist()
    expected = sorted(r.id for r in df.select("id").collect())
    assert set(seen) <= set(expected)
    assert len(seen) == len(set(seen)) == (len(expected) // 2) * 2

    first.delete()
    assert not os.path.exists(first.uri)
    assert not cache_dataframe(df, cache_root=root).reused  # written again after delete
    assert clear_cache(root) == 2
    assert os.listdir(root) == []


def test_in_memory_dataframes_are_keyed_by_their_rows(spark, tmp_path):
    root = str(tmp_path / "cache")
    a = cache_dataframe(spark.createDataFrame([(1, 2.0), (2, 3.0)], "a long, b double"), cache_root=root)
    b = cache_dataframe(spark.createDataFrame([(1, 2.0), (2, 4.0)], "a long, b double"), cache_root=root)
    a2 = cache_dataframe(spark.createDataFrame([(1, 2.0), (2, 3.0)], "a long, b double"), cache_root=root)
    assert a.key != b.key
    assert a2.reused and a2.key == a.key


def test_rewritten_source_files_get_a_new_key(spark, tmp_path):
    path, root = str(tmp_path / "src"), str(tmp_path / "cache")
    spark.range(10).write.parquet(path)
    first = cache_dataframe(spark.read.parquet(path), cache_root=root)
    spark.range(20).write.mode("overwrite").parquet(path)
    second = cache_dataframe(spark.read.parquet(path), cache_root=root)
    assert second.key != first.key and not second.reused
    with second.loader(config=LoaderConfig(batch_size=5, shuffle=False)) as loader:
        assert loader.num_rows == 20


def test_wide_plans_differing_past_the_25th_field_get_different_tables(spark, tmp_path):
    # Catalyst prints at most spark.sql.debug.maxToStringFields (25) fields of a Project and
    # then "... N more fields": the key must see the whole plan.
    from pyspark.sql import functions as F

    path, root = str(tmp_path / "wide"), str(tmp_path / "cache")
    spark.range(20).selectExpr(*[f"id * {i} as c{i}" for i in range(30)]).write.parquet(path)
    src = spark.read.parquet(path)
    cols = [F.col(f"c{i}") for i in range(30)]
    twice = src.select(*cols, (F.col("c29") * 2).alias("y"))
    thrice = src.select(*cols, (F.col("c29") * 3).alias("y"))
    a = cache_dataframe(twice, cache_root=root)
    b = cache_dataframe(thrice, cache_root=root)
    assert a.key != b.key and not b.reused
    with b.loader(config=LoaderConfig(batch_size=4, shuffle=False, columns=["c29", "y"])) as loader:
        for batch in loader:
            torch.testing.assert_close(batch["y"], batch["c29"] * 3)
    # The conf is restored afterwards.
    assert spark.conf.get("spark.sql.debug.maxToStringFields", None) is None


def test_schema_is_part_of_the_key_and_with_block_deletes(spark, source_parquet, tmp_path):
    from sparkdl.schema import DatasetSchema

    root = str(tmp_path / "cache")
    df = spark.read.parquet(source_parquet).select("id", "v")
    shaped = DatasetSchema.from_dict({"name": "s", "columns": [
        {"name": "id", "type": "int64"}, {"name": "v", "type": "array<float32>", "shape": [2, 1]}]})
    with cache_dataframe(df, cache_root=root) as plain:
        with cache_dataframe(df, cache_root=root, schema=shaped) as with_shape:
            assert with_shape.key != plain.key and not with_shape.reused
            with with_shape.loader(config=LoaderConfig(batch_size=8)) as loader:
                assert next(iter(loader))["v"].shape == (8, 2, 1)
            with plain.loader(config=LoaderConfig(batch_size=8)) as loader:
                assert next(iter(loader))["v"].shape == (8, 2)
        assert not os.path.exists(with_shape.uri) and os.path.exists(plain.uri)
    assert not os.path.exists(plain.uri)
