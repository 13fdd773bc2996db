"""The job of tests/test_objstore.py run as several processes on one store: each process
featurizes its own rows (trax_attr.parallel.process_rows), process 0 scores the targets.

    python -m trax_attr.parallel.launch --num-processes 2 tests/_objstore_job.py \
        SAVE_DIR DATA_NPZ OUT_NPY

With 768 training rows and 2 processes, process 0 writes rows [0, 256), process 1 rows
[256, 768): one chunk of rows (256 at proj_dim 32) and one process each.
"""

import sys

import numpy as np

import _trak_job as job

N_TRAIN, BATCH = 768, 128


def run(save_dir, data_path):
    """Featurize this process's rows, finalize, score on process 0; the scores."""
    import jax
    import jax.numpy as jnp

    import trax_attr
    from trax_attr import parallel

    with np.load(data_path, allow_pickle=False) as arrays:
        x, y = arrays["x"], arrays["y"]
    train = (x[:N_TRAIN], y[:N_TRAIN])
    target = (x[1500:1500 + job.N_TARGETS], y[1500:1500 + job.N_TARGETS])
    traker = trax_attr.TRAKer(model=job.apply, task="image_classification",
                              train_set_size=N_TRAIN, save_dir=save_dir, proj_dim=32,
                              proj_dtype=jnp.float32, lambda_reg=1e-2)
    mine = parallel.process_rows(N_TRAIN)
    for model_id, params in enumerate(job.checkpoints()):
        traker.load_checkpoint(params, model_id=model_id)
        for start in range(mine.start, mine.stop, BATCH):
            inds = np.arange(start, min(start + BATCH, mine.stop))
            traker.featurize(batch=(train[0][inds], train[1][inds]), inds=inds)
    traker.finalize_features()
    if jax.process_index() == 0:
        for model_id, params in enumerate(job.checkpoints()):
            traker.start_scoring_checkpoint(exp_name="test", checkpoint=params,
                                            model_id=model_id, num_targets=job.N_TARGETS)
            traker.score(batch=target, num_samples=job.N_TARGETS)
    return traker.finalize_scores(exp_name="test")


if __name__ == "__main__":
    from trax_attr.parallel import launch

    launch.initialize()
    import jax

    scores = run(sys.argv[1], sys.argv[2])
    if jax.process_index() == 0:
        np.save(sys.argv[3], scores)
