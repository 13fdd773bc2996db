"""Torch models and their Flax twins on scikit-learn's digits, for the interop tests.

The twins take the same NCHW input (the Flax ones transpose to NHWC inside) and pool
globally before the head, so their weights map one to one (see interop.weights).

Not a conftest.py: tests/test_closed_form.py imports names from tests/conftest.py as
module ``conftest``, which a second conftest.py here would shadow. Test modules import
the fixtures below by name; the trained model is cached so it is trained once per run.
"""

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop tests need torch (the interop extra)")
from torch import nn  # noqa: E402

# torch's intra-op threads fight XLA's and the other test processes for 2 cores: 100 SGD
# steps of the CNN take 11 s with 2 threads and 0.7 s with 1 on this machine.
torch.set_num_threads(1)

N_TRAIN, N_TARGETS = 300, 20


class TorchCNN(nn.Module):
    """conv-BN-relu-pool, conv-relu, global mean, linear: d = 1434 parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(x, 2)
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def nnx_cnn():
    """The nnx twin of TorchCNN (class built lazily: flax is imported only here)."""
    from flax import nnx

    class NnxCNN(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 8, (3, 3), padding=1, rngs=rngs)
            self.bn1 = nnx.BatchNorm(8, use_running_average=True, epsilon=1e-5, rngs=rngs)
            self.conv2 = nnx.Conv(8, 16, (3, 3), padding=1, rngs=rngs)
            self.fc = nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, x):
            x = x.transpose(0, 2, 3, 1)  # NCHW (torch) -> NHWC (Flax)
            x = nnx.relu(self.bn1(self.conv1(x)))
            x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            x = nnx.relu(self.conv2(x))
            return self.fc(x.mean((1, 2)))

    return NnxCNN(nnx.Rngs(1))


def linen_cnn():
    """The linen twin of TorchCNN; call with train=False."""
    from flax import linen

    class LinenCNN(linen.Module):
        @linen.compact
        def __call__(self, x, train: bool = False):
            x = x.transpose(0, 2, 3, 1)
            x = linen.Conv(8, (3, 3), padding=1, name="conv1")(x)
            x = linen.BatchNorm(use_running_average=not train, epsilon=1e-5, name="bn1")(x)
            x = linen.max_pool(linen.relu(x), (2, 2), strides=(2, 2))
            x = linen.relu(linen.Conv(16, (3, 3), padding=1, name="conv2")(x))
            return linen.Dense(10, name="fc")(x.mean((1, 2)))

    return LinenCNN()


def train_torch(model, x, y, steps, lr=0.05, seed=0):
    """Full-batch SGD with momentum in train mode (BatchNorm statistics move), then eval."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits_images(digits):
    """train (x (300, 1, 8, 8) f32, y (300,) i32), targets (x (20, 1, 8, 8), y (20,))."""
    x, y = digits
    x = x.reshape(-1, 1, 8, 8)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:N_TRAIN + N_TARGETS],
                                        y[N_TRAIN:N_TRAIN + N_TARGETS])


@functools.cache
def trained_cnn() -> "TorchCNN":
    """A TorchCNN trained for 100 steps on the 300 training digits, in eval mode."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data[:N_TRAIN] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    return train_torch(TorchCNN(), x, data.target[:N_TRAIN].astype(np.int32), steps=100,
                       lr=0.1)


@pytest.fixture(scope="session")
def torch_cnn():
    """The trained CNN (shared by all tests: tests must not change it, or restore it)."""
    return trained_cnn()
