"""HuggingFace transformers models as transformers builds them: BERT for sequence
classification, GPT-2 for causal LM, CLIP. No wrapper: the tasks' inputs reach a HF model
by keyword (trax_attr.interop.conventions) and its ``.logits`` (CLIP: its embeddings and
logit scale) come back.

Each runs the one-line TRAKer call on backend="torch" and on backend="converted"; the
torch route is checked against
an independent computation (traker 0.3.2 for BERT, per-example ``torch.autograd.grad`` of
the task's output written in torch for GPT-2 and CLIP).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import trax_attr
import zoo_models as zoo
from trax_attr import interop

pytest.importorskip("transformers", reason="needs transformers (the zoo extra; docs/models.md)")

N_TRAIN, N_TARGETS = 8, 4  # featurized 4 at a time: one batch shape, one compilation


def identity_features(model, task, batch, grad_wrt):
    """(φ (B, d) = g / √d, Q (B,)) of the torch route, identity projector, jitted."""
    model = interop.torch_model(model, "torch")
    phi, q = jax.jit(lambda b: trax_attr.featurize(model, None, b, task=task,
                                                   grad_wrt=grad_wrt))(batch)
    return np.asarray(phi, np.float64), np.asarray(q, np.float64)


def torch_features(module, output, batch, names):
    """Per-example gradients of ``output(module, *example) -> ()`` over the parameters
    ``names``, one example at a time with torch.autograd.grad: ``(B, d) / √d`` float64."""
    params = dict(module.named_parameters())
    rows = []
    for example in zip(*(torch.from_numpy(np.asarray(a)) for a in batch)):
        value = output(module, *example)
        grads = torch.autograd.grad(value, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    g = torch.stack(rows).numpy()
    return g / math.sqrt(g.shape[1])


def assert_same_features(got, want, rtol=1e-4):
    """Equal up to the order of coordinates (ours: sorted names), which Gram matrices
    ignore: compare ΦΦᵀ."""
    np.testing.assert_allclose(got @ got.T, want @ want.T, rtol=rtol,
                               atol=rtol * np.abs(want @ want.T).max())


def torch_margin(logits, label):
    is_label = torch.arange(logits.shape[-1]) == label
    return logits[label] - torch.logsumexp(logits.masked_fill(is_label, -torch.inf), -1)


# --- BERT: text classification --------------------------------------------------------------

@pytest.fixture(scope="module")
def bert():
    return zoo.bert()


@pytest.fixture(scope="module")
def text_data():
    return zoo.text(0, N_TRAIN), zoo.text(1, N_TARGETS)


@pytest.fixture(scope="module")
def bert_torch_scores(bert, text_data, tmp_path_factory):
    train, targets = text_data
    return zoo.trak(bert, "text_classification", train, targets,
                    tmp_path_factory.mktemp("bert"), backend="torch", proj_dim=256,
                    batch_size=N_TARGETS)


def test_bert_logits_are_hf_keyword_call(bert, text_data):
    """The task's (input_ids, attention_mask, token_type_ids) reach BERT by name: the
    logits are HF's, and differ from a positional call in the old documented order."""
    ids, mask, types, _ = text_data[0]
    model = trax_attr.as_model(bert, backend="torch")
    params, state = model.split(None)
    got = np.asarray(model.apply(params, state, ids, mask, types))
    t = lambda a: torch.from_numpy(a).long()  # noqa: E731
    with torch.no_grad():
        want = bert(input_ids=t(ids), attention_mask=t(mask), token_type_ids=t(types)).logits
        swapped = bert(t(ids), t(types), t(mask)).logits  # (ids, token types, mask)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(swapped.numpy(), want.numpy(), atol=1e-4)


def test_bert_torch_route(bert_torch_scores):
    assert bert_torch_scores.shape == (N_TRAIN, N_TARGETS)
    assert np.isfinite(bert_torch_scores).all() and np.abs(bert_torch_scores).max() > 0


def test_bert_converted_route_agrees(bert, text_data, bert_torch_scores, tmp_path):
    train, targets = text_data
    model = interop.torch_model(bert, "converted")
    scores = zoo.trak(
        model, "text_classification", train, targets, tmp_path, proj_dim=256,
        batch_size=N_TARGETS)
    zoo.assert_pearson(scores, bert_torch_scores, what="BERT converted vs torch")
    zoo.assert_converted_outputs(model, bert, targets[:3])


class TrakerTextModel(nn.Module):
    """What traker 0.3.2's text task needs: forward(input_ids, token_type_ids,
    attention_mask) -> logits, and torch.func.vmap-able. HF's own mask code is not (it
    branches on ``mask.all()``), so the 2-D mask goes in as the additive 4-D mask HF builds
    from it. Reference-side glue: trax_attr takes the HF model as it is."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids, attention_mask):
        additive = (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(
            torch.float32).min
        return self.model(input_ids=input_ids, token_type_ids=token_type_ids,
                          attention_mask=additive).logits


def test_bert_matches_traker_without_projection(bert, text_data, tmp_path):
    train, targets = text_data
    names = ["classifier.weight", "classifier.bias", "bert.pooler.dense.bias"]
    reorder = lambda b: (b[0], b[2], b[1], b[3])  # noqa: E731 - traker: (ids, types, mask, y)
    want = zoo.traker_scores(TrakerTextModel(bert), "text_classification", reorder(train),
                             reorder(targets), tmp_path / "trak",
                             grad_wrt=[f"model.{n}" for n in names])
    got = zoo.ours_like_traker(bert, "text_classification", train, targets,
                               tmp_path / "ours", grad_wrt=names, batch_size=N_TARGETS)
    zoo.assert_traker_parity(got, want, "BERT, backend=torch")


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_mask_goes_in_four_d_and_vmaps(name, request):
    """Once checked on a real batch, a 2-D mask reaches the model as HF's 4-D mask (padding
    for BERT, causal and padding for GPT-2): torch.func.vmap maps the call, and the logits
    are those of HF's own 2-D-mask call."""
    from trax_attr.interop.conventions import huggingface_call

    model = request.getfixturevalue(name)
    ids, mask, types, _ = (torch.from_numpy(a).long() for a in zoo.text(5, 4, vocab=48))
    inputs = (ids, mask) if name == "gpt2" else (ids, mask, types)
    checked = {}
    with torch.no_grad():
        huggingface_call(model, inputs, checked)
        assert checked == {"ok": True}
        got = torch.func.vmap(lambda *one: huggingface_call(
            model, tuple(a[None] for a in one), checked)[0])(*inputs)
        names = ("input_ids", "attention_mask", "token_type_ids")
        want = model(**dict(zip(names, inputs))).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_token_type_ids_a_model_does_not_take_are_refused(tmp_path):
    """DistilBERT's forward has no token_type_ids, and its **kwargs would swallow them
    unused: a batch holding them is refused on the first batch, on both routes, saying
    which inputs this model takes (not blamed on conversion)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2,
                                           hidden_dim=32, max_position_embeddings=16,
                                           num_labels=3)
    module = transformers.DistilBertForSequenceClassification(config).eval()
    for backend in ("torch", "converted"):
        traker = trax_attr.TRAKer(model=module, task="text_classification", train_set_size=4,
                                  save_dir=tmp_path / backend, proj_dim=8, backend=backend)
        traker.load_checkpoint(None, model_id=0)
        with pytest.raises(ValueError, match=r"DistilBertForSequenceClassification.forward "
                           r"takes no token_type_ids.*pass \(input_ids, attention_mask, "
                           r"labels\)"):
            traker.featurize(batch=zoo.text(0, 4), num_samples=4)


# --- GPT-2: causal LM -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2():
    return zoo.gpt2()


def lm_data(seed, n):
    ids, mask, _, _ = zoo.text(seed, n, length=10, vocab=48)
    return ids, mask


def torch_lm_output(model, ids, mask):
    """Σ_t w_t margin_t of one sequence, in torch (trax_attr.CausalLM's f)."""
    logits = model(input_ids=ids[None].long(), attention_mask=mask[None].long()).logits[0]
    w = (mask[:-1] * mask[1:]).float()
    margins = torch.stack([torch_margin(logits[t], ids[t + 1].long())
                           for t in range(len(ids) - 1)])
    return (w * margins).sum()


def test_gpt2_torch_route_matches_torch_autograd(gpt2):
    """GPT-2's second positional argument is its KV cache: the attention mask must reach
    it by name. Features equal torch.autograd's of the causal-LM output written in torch."""
    batch = lm_data(2, 6)
    names = ["transformer.ln_f.weight", "transformer.h.0.mlp.c_proj.bias"]
    phi, q = identity_features(gpt2, "causal_lm", batch, names)
    want = torch_features(gpt2, torch_lm_output, batch, names)
    assert_same_features(phi, want)
    with torch.no_grad():
        ids, mask = (torch.from_numpy(a).long() for a in batch)
        logits = gpt2(input_ids=ids, attention_mask=mask).logits
        p = torch.softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        w = (mask[:, :-1] * mask[:, 1:]).double()
        want_q = ((1 - p.double()) * w).sum(-1) / w.sum(-1)
    np.testing.assert_allclose(q, want_q.numpy(), rtol=1e-5)


def test_gpt2_one_line_and_converted(gpt2, tmp_path):
    train, targets = lm_data(0, N_TRAIN), lm_data(1, N_TARGETS)
    torch_scores = zoo.trak(gpt2, "causal_lm", train, targets, tmp_path / "torch",
                            backend="torch", proj_dim=256, batch_size=N_TARGETS)
    assert np.isfinite(torch_scores).all() and np.abs(torch_scores).max() > 0
    model = interop.torch_model(gpt2, "converted")
    scores = zoo.trak(
        model, "causal_lm", train, targets, tmp_path / "converted", proj_dim=256,
        batch_size=N_TARGETS)
    zoo.assert_pearson(scores, torch_scores, what="GPT-2 converted vs torch")
    zoo.assert_converted_outputs(model, gpt2, targets)


# --- CLIP ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_clip():
    return zoo.hf_clip()


@pytest.fixture(scope="module")
def clip_task(hf_clip):
    images, texts, _ = zoo.clip_pairs(9, 12)
    bank = trax_attr.clip_embedding_bank(hf_clip, None, images, texts, backend="torch")
    with torch.no_grad():
        out = hf_clip(pixel_values=torch.from_numpy(images),
                      input_ids=torch.from_numpy(texts).long())
    np.testing.assert_allclose(bank.image_embeddings, out.image_embeds.numpy(), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(bank.text_embeddings, out.text_embeds.numpy(), rtol=1e-5,
                               atol=1e-6)
    return trax_attr.CLIP(bank=bank, key=jax.random.key(0), num_compare=6)


def test_hf_clip_torch_route_matches_torch_autograd(hf_clip, clip_task):
    """HF's CLIPModel takes (input_ids, pixel_values, ...) and returns a CLIPOutput; the
    task's (images, texts) reach it by name and its embeddings and logit scale come back.
    Features equal torch.autograd's of the CLIP output written in torch (same comparison
    sets)."""
    batch = zoo.clip_pairs(3, 5)
    names = ["visual_projection.weight", "text_projection.weight"]
    phi, q = identity_features(hf_clip, clip_task, batch, names)
    u_bank = torch.tensor(np.asarray(clip_task.bank.image_embeddings))
    v_bank = torch.tensor(np.asarray(clip_task.bank.text_embeddings))

    def output(model, image, text, index):
        out = model(pixel_values=image[None], input_ids=text[None].long())
        u, v = out.image_embeds[0], out.text_embeds[0]
        chosen = torch.from_numpy(np.asarray(clip_task.comparison_set(jnp.asarray(index))))
        return (2 * (u @ v) - torch.logsumexp(v_bank[chosen] @ u, 0)
                - torch.logsumexp(u_bank[chosen] @ v, 0))

    assert_same_features(phi, torch_features(hf_clip, output, batch, names))
    assert np.all((q > 0) & (q < 1))


def test_hf_clip_one_line_and_converted(hf_clip, clip_task, tmp_path):
    train, targets = zoo.clip_pairs(0, N_TRAIN), zoo.clip_pairs(1, N_TARGETS)
    torch_scores = zoo.trak(hf_clip, clip_task, train, targets, tmp_path / "torch",
                            backend="torch", proj_dim=256, batch_size=N_TARGETS)
    assert np.isfinite(torch_scores).all() and np.abs(torch_scores).max() > 0
    model = interop.torch_model(hf_clip, "converted")
    scores = zoo.trak(
        model, clip_task, train, targets, tmp_path / "converted", proj_dim=256,
        batch_size=N_TARGETS)
    zoo.assert_pearson(scores, torch_scores, what="HF CLIP converted vs torch")
    zoo.assert_converted_outputs(model, hf_clip, targets[:2])
