"""How training batches reach the devices (`jaxal.train`, `input_pipeline`): every pipeline trains to the
same bits, on one device and data parallel, and the resident one sends no batch from the host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxal import parallel, train
from jaxal.data import Normalization
from jaxal.models import MLP, adapt
from jaxal.train import TrainOptions, create_train_state, resolve_input_pipeline, train_model

MESH = parallel.make_mesh(8)
RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (100, 4, 4, 1), dtype=np.uint8)
LABELS = RNG.integers(0, 3, 100).astype(np.int32)
LABELED = RNG.choice(100, 43, replace=False)  # not sorted, not a multiple of the batch


def _train(pipeline, mesh=None):
    model = adapt(MLP(3, hidden=(8,)), Normalization(1 / 255))
    options = TrainOptions(augmentation="crop_flip", crop_padding=1)
    state = create_train_state(model, None, jax.random.key(0), IMAGES.shape[1:], options)
    state, metrics = train_model(state, IMAGES, LABELS, LABELED, model=model, lossnet=None, options=options,
                                 epochs=2, batch_size=16, lr=0.1, lr_milestones=(), lr_gamma=0.1, detach_epoch=0,
                                 seed=3, mesh=mesh, input_pipeline=pipeline)
    return jax.tree.map(np.asarray, parallel.local(state)), metrics


@pytest.mark.parametrize("mesh", [None, MESH], ids=["one_device", "8_devices"])
def test_every_pipeline_trains_to_the_same_bits(mesh, monkeypatch):
    reference, metrics = _train("host", mesh)
    sent = []
    shard_batch = parallel.shard_batch
    monkeypatch.setattr(parallel, "shard_batch", lambda tree, m: sent.append(1) or shard_batch(tree, m))
    for pipeline in ("prefetch", "resident", "auto"):
        sent.clear()
        state, other_metrics = _train(pipeline, mesh)
        jax.tree.map(np.testing.assert_array_equal, state, reference)
        assert other_metrics == metrics
        # 2 epochs of 3 batches: the host pipelines send each batch, the resident one none (auto is resident).
        assert len(sent) == (6 if pipeline == "prefetch" else 0), pipeline


def test_auto_keeps_what_fits_on_the_device():
    assert resolve_input_pipeline("auto", 61 * 2**20) == "resident"  # CIFAR-10's 20000 labelled images
    assert resolve_input_pipeline("auto", train.RESIDENT_MAX_BYTES + 1) == "prefetch"  # a CPU says no size
    assert resolve_input_pipeline("host", 10) == "host"
    with pytest.raises(ValueError, match="input_pipeline must be one of auto, resident, prefetch, host"):
        resolve_input_pipeline("gpu", 10)
