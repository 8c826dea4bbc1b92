"""Streaming of Delta table versions into torch: sharded, shuffled, resumable (replaces Petastorm).

``TableLoader`` streams one rank's shard of a table as ``dict[str, torch.Tensor]`` batches;
``cache_dataframe`` materializes any Spark DataFrame once into a Delta cache table that a
loader reads. See docs/loader.md.
"""

from sparkdl.data.config import LoaderConfig
from sparkdl.data.converter import CachedTable, cache_dataframe, clear_cache, dataframe_key
from sparkdl.data.loader import TableLoader

__all__ = ["LoaderConfig", "TableLoader", "CachedTable", "cache_dataframe", "clear_cache", "dataframe_key"]
