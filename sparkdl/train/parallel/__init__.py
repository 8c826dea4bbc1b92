"""Models bigger than one rank: sharded data parallel (FSDP2), pipeline stages, and their meshes.

The pieces here are model-agnostic building blocks; the strategies that plug them into the
training loop are ``sparkdl.train.strategies.fsdp`` and ``sparkdl.train.strategies.pipeline``.
docs/parallelism.md says how to choose.
"""

from sparkdl.train.parallel.mesh import (PARALLELISMS, MeshLayout, build_mesh, check_model_parallelism,
                                         check_parallelism, check_split_points, mesh_layout)

__all__ = ["PARALLELISMS", "MeshLayout", "build_mesh", "check_model_parallelism", "check_parallelism",
           "check_split_points", "mesh_layout"]
