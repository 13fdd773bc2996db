"""Per-example gradients of torchvision's resnet18: the converted route against torch.func.

For each route, examples per second of
* ``forward``: the batched forward pass (jax.jit of the converted function vs torch);
* ``grad fc``: per-example gradients of the classification margin over the head only
  (``grad_wrt="fc.*"``: a forward through the whole network, a backward through fc);
* ``grad all``: per-example gradients over all 11.2M parameters;
the converted route as TRAK computes them, ``jit(vmap(grad(margin)))`` of one example
``(1, 3, H, W)``, torch's as backend="torch" does, ``torch.func.vmap(torch.func.grad)``.
Random init, eval mode, CIFAR-sized images; best of ``--repeats`` timed calls after a
warm-up call (which holds the export and the XLA compilation). Prints one JSON object:

    PYTHONPATH=src python benchmarks/interop_resnet.py [--batch 16] [--image 32] [--threads 1]

Run it with another checkout's ``src`` on PYTHONPATH to compare converter versions.
"""

import argparse
import json
import time

import numpy as np
import torch

# torchvision's C ops do not load next to a CPU-only torch 2.13; its models are pure
# Python, so defining the two operators its meta registrations expect is enough.
for _name in ("nms", "qnms"):
    try:
        torch.library.define(f"torchvision::{_name}",
                             "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already defined (the real ops loaded)
        pass
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torchvision  # noqa: E402

from trax_attr import interop  # noqa: E402

CLASSES = 10


def jax_cases(module, x, y):
    apply = interop.convert(module)
    params = {n: jnp.asarray(p.detach().numpy()) for n, p in module.named_parameters()}
    buffers = {n: jnp.asarray(b.numpy()) for n, b in module.named_buffers()
               if b.is_floating_point()}
    head = {k: v for k, v in params.items() if k.startswith("fc.")}
    body = {k: v for k, v in params.items() if not k.startswith("fc.")}
    x, y = jnp.asarray(x.numpy()), jnp.asarray(y.numpy())

    def margin(p, image, label):
        logits = apply(p, buffers, image[None])[0]
        others = jnp.where(jnp.arange(CLASSES) == label, -jnp.inf, logits)
        return logits[label] - jax.nn.logsumexp(others)

    forward = jax.jit(lambda p, images: apply(p, buffers, images))
    grad_fc = jax.jit(jax.vmap(jax.grad(lambda h, i, l: margin({**body, **h}, i, l)),
                               (None, 0, 0)))
    grad_all = jax.jit(jax.vmap(jax.grad(margin), (None, 0, 0)))
    return {"forward": lambda: jax.block_until_ready(forward(params, x)),
            "grad fc": lambda: jax.block_until_ready(grad_fc(head, x, y)),
            "grad all": lambda: jax.block_until_ready(grad_all(params, x, y))}


def torch_cases(module, x, y):
    params = {n: p.detach() for n, p in module.named_parameters()}
    buffers = dict(module.named_buffers())
    head = {k: v for k, v in params.items() if k.startswith("fc.")}
    body = {k: v for k, v in params.items() if not k.startswith("fc.")}

    def margin(p, image, label):
        logits = torch.func.functional_call(module, {**buffers, **p}, (image[None],))[0]
        is_label = torch.arange(CLASSES) == label
        return (torch.where(is_label, logits, 0).sum()
                - torch.logsumexp(torch.where(is_label, -torch.inf, logits), 0))

    grad_fc = torch.func.vmap(torch.func.grad(lambda h, i, l: margin({**body, **h}, i, l)),
                              (None, 0, 0))
    grad_all = torch.func.vmap(torch.func.grad(margin), (None, 0, 0))
    return {"forward": lambda: module(x), "grad fc": lambda: grad_fc(head, x, y),
            "grad all": lambda: grad_all(params, x, y)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    module = torchvision.models.resnet18(num_classes=CLASSES).eval()
    x = torch.randn(args.batch, 3, args.image, args.image)
    y = torch.randint(0, CLASSES, (args.batch,))
    routes = {"converted": jax_cases(module, x, y), "torch": torch_cases(module, x, y)}
    times = {(r, c): [] for r, cases in routes.items() for c in cases}
    with torch.no_grad():
        for (route, case) in times:
            routes[route][case]()  # warm-up: export, compilation
        for _ in range(args.repeats):  # interleaved, so both routes see the same load
            for (route, case), spent in times.items():
                start = time.perf_counter()
                routes[route][case]()
                spent.append(time.perf_counter() - start)
    result = {"batch": args.batch, "image": args.image, "torch_threads": args.threads}
    result.update({f"{route}/{case} ex/s": round(args.batch / min(spent), 1)
                   for (route, case), spent in times.items()})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
