"""Scale-out: meshes, shard_map wrappers of the engine's kernels, several hosts.

* :mod:`.mesh`: the mesh a TRAKer splits work over, padding helpers;
* :mod:`.kernels`: featurize, XᵀX, fold and score kernels under ``shard_map``;
* :mod:`.hosts`: rows per process, exact sums and gathers over processes, barriers;
* :mod:`.solve`: XᵀX and its inverse sharded by rows over every device (large proj_dim);
* :mod:`.launch`: ``python -m trax_attr.parallel.launch`` starts a local multi-process job.
"""

from . import solve
from .hosts import (barrier, broadcast_int, process_allgather, process_concat, process_rows,
                    process_sum)
from .kernels import featurize, fold, gram, proj_columns, scores, topk
from .mesh import (DATA_AXIS, PROJ_AXIS, batch_shards, check_mesh, default_mesh, pad_axis,
                   pad_batch, pad_rows, round_up)

__all__ = ["DATA_AXIS", "PROJ_AXIS", "barrier", "batch_shards", "broadcast_int",
           "check_mesh", "default_mesh", "featurize", "fold", "gram", "pad_axis",
           "pad_batch", "pad_rows", "process_allgather", "process_concat", "process_rows",
           "process_sum", "proj_columns", "round_up", "scores", "solve", "topk"]
