"""The converted route on models nobody here wrote: torchvision, HuggingFace, open_clip.

Tiny configurations, random init, nothing downloaded. For each model: the converted
function's output equals torch's, and TRAK scores of the converted route (JAX gradients of
the exported graph) agree with the torch route's (torch.func gradients of the module)
per target (Pearson > 0.999) at a ridge λ, through one JAX task (the torch route runs the
module's forward and VJP in torch inside it).
Each model is wrapped in a small module returning ``(B, C)`` logits so that both routes
call it positionally, as ``functional_call`` does.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="interop tests need torch (the interop extra)")
transformers = pytest.importorskip("transformers", reason="HuggingFace models need transformers")

import trax_attr  # noqa: E402
from trax_attr import interop  # noqa: E402
from trax_attr.tasks.classification import classification_margin, one_minus_p  # noqa: E402

from torch import nn  # noqa: E402

VOCAB, T, CLASSES, N, M = 40, 6, 3, 10, 3


@dataclasses.dataclass(frozen=True)
class Margin(trax_attr.ModelOutput):
    """Classification margin of ``apply(params, *inputs) -> (B, C)``; any number of inputs."""

    def get_output(self, apply_fn, params, *example):
        *inputs, label = example
        return classification_margin(apply_fn(params, *(x[None] for x in inputs))[0], label)

    def get_out_to_loss_grad(self, apply_fn, params, batch):
        *inputs, labels = batch
        return one_minus_p(apply_fn(params, *inputs), labels)


class Bert(nn.Module):
    def __init__(self):
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, num_labels=CLASSES)
        self.model = transformers.BertForSequenceClassification(config)

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=additive(attention_mask)).logits


class GPT2(nn.Module):
    """GPT-2's next-token logits at the last position, the first CLASSES tokens."""

    def __init__(self):
        super().__init__()
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16,
                                         n_layer=1, n_head=2)
        self.model = transformers.GPT2LMHeadModel(config)

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=additive(attention_mask, True),
                         use_cache=False)
        return out.logits[:, -1, :CLASSES]


class HFClip(nn.Module):
    """CLIPModel as a zero-shot classifier: images against CLASSES fixed prompts, held in
    a non-persistent integer buffer (a constant of the converted function)."""

    def __init__(self):
        super().__init__()
        config = transformers.CLIPConfig(
            text_config=dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2,
                             max_position_embeddings=8),
            vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, image_size=16, patch_size=8),
            projection_dim=8)
        self.model = transformers.CLIPModel(config)
        self.register_buffer("prompts", torch.randint(0, VOCAB, (CLASSES, T)), persistent=False)

    def forward(self, pixel_values):
        return self.model(input_ids=self.prompts, pixel_values=pixel_values).logits_per_image


class OpenClip(nn.Module):
    def __init__(self):
        super().__init__()
        open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is not installed")
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        self.model = open_clip.CLIP(
            embed_dim=8, vision_cfg=CLIPVisionCfg(layers=1, width=16, head_width=8,
                                                  patch_size=8, image_size=16),
            text_cfg=CLIPTextCfg(context_length=T, vocab_size=VOCAB, width=16, heads=2,
                                 layers=1))
        self.register_buffer("prompts", torch.randint(0, VOCAB, (CLASSES, T)), persistent=False)

    def forward(self, image):
        image_features, text_features, scale = self.model(image, self.prompts)
        return scale * image_features @ text_features.T


def additive(attention_mask, causal=False):
    """``(B, T)`` 0/1 mask -> ``(B, 1, T, T)`` additive float mask: transformers' own 2-D
    mask path reads a tensor's value (cannot run under torch.func.vmap), a 4-D one works
    in both routes."""
    keep = attention_mask[:, None, None, :].bool().expand(-1, 1, T, T)
    if causal:
        keep = keep & torch.ones(T, T, dtype=torch.bool).tril()
    return torch.where(keep, 0.0, torch.finfo(torch.float32).min)


def tokens(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[::2, T - 2:] = 0  # padding on every other example
    return ids, mask


def images(n, seed, size=16):
    return (torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed)),)


def resnet18():
    import torchvision  # the conftest fixture defines what it needs first

    return torchvision.models.resnet18(num_classes=CLASSES)


MODELS = {  # name -> (module factory, inputs of n examples, grad_wrt)
    "bert": (Bert, tokens, ("model.bert.pooler.*", "model.classifier.*")),
    "gpt2": (GPT2, tokens, ("model.transformer.h.0.mlp.c_proj.*", "model.transformer.ln_f.*")),
    "hf_clip": (HFClip, images, ("model.visual_projection.*", "model.vision_model.post_*")),
    "open_clip": (OpenClip, images, ("model.visual.proj", "model.visual.ln_post.*")),
    "resnet18": (resnet18, lambda n, seed: images(n, seed, 32), ("fc.*",)),
}


@pytest.fixture(params=sorted(MODELS))
def case(request):
    # transformers and open_clip import torchvision when it is installed: its fixture
    # defines the operators it needs next to a CPU-only torch first
    request.getfixturevalue("torchvision")
    make, inputs, grad_wrt = MODELS[request.param]
    torch.manual_seed(0)
    return request.param, make().eval(), inputs, grad_wrt


def _jax(tensors):
    return tuple(jnp.asarray(t.numpy()) for t in tensors)


def test_converted_output_equals_torch(case):
    name, module, inputs, _ = case
    x = inputs(4, 1)
    apply = interop.convert(module)
    params = {n: jnp.asarray(p.detach().numpy()) for n, p in module.named_parameters()}
    buffers = {n: jnp.asarray(b.numpy()) for n, b in module.named_buffers()
               if b.is_floating_point()}
    got = np.asarray(apply(params, buffers, *_jax(x)))
    with torch.no_grad():
        want = module(*x).numpy()
    assert got.shape == want.shape == (4, CLASSES)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(),
                               err_msg=name)


def test_converted_and_torch_route_scores_agree(case):
    name, module, inputs, grad_wrt = case
    labels = np.arange(N + M, dtype=np.int32) % CLASSES
    batch = (*_jax(inputs(N + M, 2)), labels)  # the first N train, the last M targets
    scores = {}
    for backend in ("converted", "torch"):
        model = interop.torch_model(module, backend)
        phi, q = trax_attr.featurize(model, None, batch, task=Margin(), grad_wrt=grad_wrt)
        np.testing.assert_array_less(0, np.abs(np.asarray(phi)).max())  # not all zero
        scores[backend] = np.asarray(trax_attr.trak_scores(
            phi[None, :N], q[None, :N], phi[None, N:], lambda_reg=1e-3))
    agreement = interop.compare(scores["converted"], scores["torch"])
    assert np.all(agreement.pearson > 0.999), (name, agreement.pearson)
