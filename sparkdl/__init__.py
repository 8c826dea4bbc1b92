"""sparkdl: Spark ETL to Delta, per-rank streaming into torch, barrier-mode DDP training,
versioned models in the lakehouse and batch inference with Spark."""

from sparkdl.errors import *  # noqa: F401,F403
from sparkdl.errors import __all__ as _errors_all
from sparkdl.lakehouse import Lakehouse, TableSnapshot, WriteResult, read_table, snapshot, table_version, write_table
from sparkdl.schema import ColumnSpec, DatasetSchema
from sparkdl.session import spark_session

__version__ = "0.1.0"

__all__ = [
    *_errors_all,
    "ColumnSpec",
    "DatasetSchema",
    "Lakehouse",
    "TableSnapshot",
    "WriteResult",
    "read_table",
    "snapshot",
    "spark_session",
    "table_version",
    "write_table",
]
