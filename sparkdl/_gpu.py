"""Which CUDA device a Spark task's ``gpu`` resource address means inside this process.

Spark hands a task the addresses its discovery script printed: physical GPU indexes
(``nvidia-smi`` order). When a resource manager (YARN, the Kubernetes device plugin) also set
``CUDA_VISIBLE_DEVICES``, this process sees only those GPUs, renumbered from 0, so the
address must be looked up in that list: address "3" under ``CUDA_VISIBLE_DEVICES=2,3`` is
``cuda:1``. TorchDistributor makes the same translation.
"""

from __future__ import annotations

import os

__all__ = ["cuda_ordinal"]


def cuda_ordinal(address: str) -> int:
    """The ``cuda:<n>`` ordinal of a Spark ``gpu`` resource address in this process."""
    address = str(address).strip()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if address in entries:
            return entries.index(address)
        raise RuntimeError(
            f"the task was given GPU address {address!r}, which is not among CUDA_VISIBLE_DEVICES="
            f"{visible!r} of this executor: the discovery script must print the ids listed in "
            "CUDA_VISIBLE_DEVICES (spark-conf/gpu-discovery.sh does)"
        )
    if address.isdigit():
        return int(address)
    raise RuntimeError(
        f"GPU address {address!r} is not a device index; without CUDA_VISIBLE_DEVICES the discovery "
        "script must print nvidia-smi indexes (spark-conf/gpu-discovery.sh does)"
    )
