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
