"""Compare TRAK scores of a torch CNN and its Flax twin, and (if installed) traker 0.3.2.

    PYTHONPATH=src python examples/compare_torch.py      # about 40 s on 2 busy CPU cores

A small CNN with BatchNorm is trained in torch on 300 scikit-learn digits; its weights
are copied into an nnx twin; TRAKer attributes 20 held-out digits three ways:
  * flax       the nnx twin (JAX gradients of the Flax model),
  * converted  TRAKer(model=torch_module)               (the module converted to JAX),
  * torch      TRAKer(model=torch_module, backend="torch")  (torch.func gradients),
all with the identity projector (no projection, exact) in float32, and with traker
0.3.2 (NoOpProjector, traker_inverse_rescale=True on our side) when it is installed.
"""

import logging
import tempfile

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from sklearn.datasets import load_digits
from torch import nn

from trax_attr import interop
import trax_attr

N_TRAIN, N_TARGETS, LAMBDA = 300, 20, 1.0


class TorchCNN(nn.Module):
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


class NnxCNN(nnx.Module):
    """The twin: same layer names, NHWC inside, torch's BatchNorm epsilon."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 8, (3, 3), padding=1, rngs=rngs)
        self.bn1 = nnx.BatchNorm(8, use_running_average=True, epsilon=1e-5, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), padding=1, rngs=rngs)
        self.fc = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        x = x.transpose(0, 2, 3, 1)
        x = nnx.relu(self.bn1(self.conv1(x)))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        x = nnx.relu(self.conv2(x))
        return self.fc(x.mean((1, 2)))


def attribute(model, checkpoint, train, targets, backend=None):
    traker = trax_attr.TRAKer(model=model, task="image_classification", train_set_size=N_TRAIN,
                              save_dir=tempfile.mkdtemp(), projector="identity",
                              lambda_reg=LAMBDA, proj_dtype=jnp.float32,
                              traker_inverse_rescale=True, backend=backend)
    traker.load_checkpoint(checkpoint, model_id=0)
    traker.featurize(batch=train, num_samples=N_TRAIN)
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="digits", checkpoint=checkpoint, model_id=0,
                                    num_targets=N_TARGETS)
    traker.score(batch=targets, num_samples=N_TARGETS)
    return traker.finalize_scores(exp_name="digits")


def traker_reference(module, train, targets):
    try:
        import trak
        from trak.projectors import NoOpProjector
    except ImportError:
        return None
    traker = trak.TRAKer(model=module, task="image_classification", train_set_size=N_TRAIN,
                         save_dir=tempfile.mkdtemp(), device="cpu", use_half_precision=False,
                         lambda_reg=LAMBDA, projector=NoOpProjector(device="cpu"),
                         logging_level=logging.ERROR)
    traker.load_checkpoint(module.state_dict(), model_id=0)
    x, y = (torch.from_numpy(a) for a in train)
    traker.featurize(batch=(x, y.long()), num_samples=N_TRAIN)
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="digits", checkpoint=module.state_dict(),
                                    model_id=0, num_targets=N_TARGETS)
    tx, ty = (torch.from_numpy(a) for a in targets)
    traker.score(batch=(tx, ty.long()), num_samples=N_TARGETS)
    return np.asarray(traker.finalize_scores(exp_name="digits"))


def main():
    torch.set_num_threads(1)  # on few cores torch's threads fight XLA's: 15x faster here
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int32)
    train = (x[:N_TRAIN], y[:N_TRAIN])
    targets = (x[N_TRAIN:N_TRAIN + N_TARGETS], y[N_TRAIN:N_TRAIN + N_TARGETS])

    torch.manual_seed(0)
    module = TorchCNN()
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(module(torch.from_numpy(train[0])),
                                    torch.from_numpy(train[1]).long()).backward()
        opt.step()
    module.eval()
    twin = interop.torch_to_flax(module, NnxCNN(nnx.Rngs(0)))  # torch -> Flax weights

    flax = attribute(twin, None, train, targets)
    converted = attribute(module, module.state_dict(), train, targets)
    native = attribute(module, module.state_dict(), train, targets, backend="torch")
    print("converted torch vs Flax twin\n" + str(interop.compare(converted, flax)), "\n")
    print("torch-native vs Flax twin\n" + str(interop.compare(native, flax)), "\n")
    reference = traker_reference(module, train, targets)
    if reference is None:
        print("traker is not installed (pip install traker==0.3.2): reference skipped.")
    else:
        print("Flax twin vs traker 0.3.2\n" + str(interop.compare(flax, reference)))


if __name__ == "__main__":
    main()
