"""The delta-spark side of the interoperability tests, run in its own process.

    PYTHONPATH=<pyspark for delta-spark> python storage/delta_spark_side.py SPEC.json OUT.json

It runs on the pyspark that delta-spark was built for (storage/jars.py ``delta_pyspark``),
with delta-spark and delta-storage on ``spark.jars`` and Delta's SQL extension and catalog: one
SparkSession for everything the tests ask of delta-spark. SPEC.json:

- ``read``: a table sparkdl wrote; OUT gets its rows (latest and ``VERSION AS OF`` each listed
  version) and ``DESCRIBE HISTORY``;
- ``write``: a folder; delta-spark writes tables there and OUT gets the rows each should read as:
  ``merged`` (write, MERGE, OPTIMIZE), ``dv`` (deletion vectors, a DELETE that sets one),
  ``mapped`` (column mapping by name, a column renamed).

Rows are lists, sorted, so the two sides compare them as plain JSON.
"""

from __future__ import annotations

import json
import sys


def _rows(df) -> list[list]:
    return sorted([list(r) for r in df.collect()], key=repr)


def main(spec_path: str, out_path: str) -> None:
    from pyspark.sql import SparkSession

    spec = json.loads(open(spec_path).read())
    spark = (
        SparkSession.builder.master("local[1]").appName("delta-spark-interop")
        .config("spark.jars", ",".join(spec["jars"]))
        .config("spark.sql.extensions", "io.delta.sql.DeltaSparkSessionExtension")
        .config("spark.sql.catalog.spark_catalog", "org.apache.spark.sql.delta.catalog.DeltaCatalog")
        .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", "1").config("spark.default.parallelism", "1")
        # Log replay is a shuffle of its own: one partition for these small tables.
        .config("spark.databricks.delta.snapshotPartitions", "1")
        .config("spark.sql.session.timeZone", "UTC")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    out: dict = {"spark": spark.version}

    read = spec.get("read")
    if read:
        path = read["path"]
        out["read"] = {
            "latest": _rows(spark.read.format("delta").load(path)),
            "versions": {str(v): _rows(spark.sql(f"SELECT * FROM delta.`{path}` VERSION AS OF {v}"))
                         for v in read["versions"]},
            "history": [[r["version"], r["operation"]] for r in
                        spark.sql(f"DESCRIBE HISTORY delta.`{path}`").orderBy("version").collect()],
            "columns": spark.read.format("delta").load(path).columns,
        }

    folder = spec.get("write")
    if folder:
        written: dict = {}
        t = f"{folder}/merged"
        spark.range(0, 100, 1, 2).selectExpr("id", "CAST(id AS DOUBLE) AS x").write.format("delta").save(t)
        spark.range(50, 150, 1, 1).selectExpr("id", "-1.0D AS x").createOrReplaceTempView("updates")
        spark.sql(f"""MERGE INTO delta.`{t}` AS t USING updates AS u ON t.id = u.id
                      WHEN MATCHED THEN UPDATE SET x = u.x WHEN NOT MATCHED THEN INSERT *""")
        spark.sql(f"OPTIMIZE delta.`{t}`")
        written["merged"] = {"rows": _rows(spark.read.format("delta").load(t)),
                             "history": [r["operation"] for r in
                                         spark.sql(f"DESCRIBE HISTORY delta.`{t}`").orderBy("version").collect()]}

        t = f"{folder}/dv"
        spark.sql(f"""CREATE TABLE delta.`{t}` (id BIGINT, x DOUBLE) USING delta
                      TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')""")
        spark.range(0, 100, 1, 1).selectExpr("id", "CAST(id AS DOUBLE) AS x").write.format("delta").mode("append").save(t)
        spark.sql(f"DELETE FROM delta.`{t}` WHERE id % 10 = 0")
        detail = spark.sql(f"DESCRIBE DETAIL delta.`{t}`").collect()[0]
        written["dv"] = {"rows": _rows(spark.read.format("delta").load(t)),
                         "features": sorted(detail["tableFeatures"] or [])}

        t = f"{folder}/mapped"
        spark.sql(f"""CREATE TABLE delta.`{t}` (id BIGINT, x DOUBLE) USING delta
                      TBLPROPERTIES ('delta.columnMapping.mode' = 'name')""")
        spark.range(0, 50, 1, 1).selectExpr("id", "CAST(id AS DOUBLE) AS x").write.format("delta").mode("append").save(t)
        spark.sql(f"ALTER TABLE delta.`{t}` RENAME COLUMN x TO renamed_x")
        written["mapped"] = {"rows": _rows(spark.read.format("delta").load(t)),
                             "columns": spark.read.format("delta").load(t).columns}
        out["write"] = written

    spark.stop()
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
