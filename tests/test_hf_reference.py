"""Our encoder against a reference no one here wrote: transformers' BertForMaskedLM (post-LN
layout) and MegatronBertForMaskedLM (pre-LN layout).

The same weights (through rapidnlp.convert.hf) and the same real MLM batches (padding
included) must give the same logits, the same gradients and the same 20-step loss curve.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub look-up hangs here; nothing below needs it

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rapidnlp.config import ModelConfig, TrainConfig
from rapidnlp.convert.hf import from_hf_state_dict, hf_class, load_into_hf, to_hf_state_dict
from rapidnlp.data.mlm import IGNORE_INDEX, MLMSampleBuilder, SpecialIds, build_sample_ranges
from rapidnlp.errors import UserError
from rapidnlp.model.bert import BertForMLM
from rapidnlp.optim import lr_at, param_groups
from rapidnlp.pretrain.mlm import mlm_loss_sum

SEQ_LEN, MAX_PRED, BATCH, STEPS = 64, 12, 8, 20
SPECIAL = SpecialIds(pad=0, cls=2, sep=3, mask=4, vocab_size=1000)


def tiny_config(norm_position: str) -> ModelConfig:
    # 4 x 128, 4 heads; 1024 rows
    return ModelConfig(vocab_size=1000, max_position_embeddings=SEQ_LEN, norm_position=norm_position)


def builder(num_docs: int = BATCH * STEPS) -> MLMSampleBuilder:
    """One sentence per document, 8..62 tokens: most samples are padded.

    Runs of consecutive ids over a 60-id alphabet, so that the masked tokens are predictable and
    the loss falls visibly within 20 steps; the rest of the vocabulary still gets random replacements.
    """
    rng = np.random.default_rng(0)
    docs = [
        5 + (rng.integers(60) + np.arange(n)) % 60 for n in rng.integers(8, SEQ_LEN - 1, size=num_docs)
    ]
    ranges = build_sample_ranges(np.array([len(d) for d in docs]), np.arange(num_docs + 1), SEQ_LEN - 2)
    return MLMSampleBuilder(docs, ranges, SPECIAL, seq_len=SEQ_LEN, max_predictions=MAX_PRED, seed=7)


def hf_labels(batch) -> torch.Tensor:
    """Full-sequence labels (-100 except at the masked positions) from positions + labels."""
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    rows, slots = torch.nonzero(batch["mlm_labels"] != IGNORE_INDEX, as_tuple=True)
    labels[rows, batch["mlm_positions"][rows, slots]] = batch["mlm_labels"][rows, slots]
    return labels


def ours_loss(model, batch) -> torch.Tensor:
    logits = model.mlm_logits(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["mlm_positions"])
    return mlm_loss_sum(logits, batch["mlm_labels"]) / (batch["mlm_labels"] != IGNORE_INDEX).sum()


def hf_loss(hf, batch) -> torch.Tensor:
    return hf(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"], labels=hf_labels(batch),
    ).loss


@pytest.fixture(scope="module")
def data() -> MLMSampleBuilder:
    return builder()


@pytest.fixture(params=["post", "pre"])
def pair(request):
    torch.manual_seed(0)
    model = BertForMLM(tiny_config(request.param))
    hf = load_into_hf(model)
    assert type(hf).__name__ == {"post": "BertForMaskedLM", "pre": "MegatronBertForMaskedLM"}[request.param]
    return model, hf


def test_state_dict_round_trip_is_exact(pair, tmp_path):
    model, hf = pair
    state = model.state_dict()
    hf_state = to_hf_state_dict(state, model.cfg)
    assert hf_state.keys() == hf.state_dict().keys()
    back = from_hf_state_dict(hf_state, model.cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)

    # What save_pretrained writes (only the sources of the ties) converts back too, and
    # from_pretrained re-ties the decoder bias from cls.predictions.bias: our bias is the one used.
    with torch.no_grad():
        model.lm_head.decoder.bias.normal_()
        hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg))
    hf.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "cls.predictions.bias" in saved
    back = from_hf_state_dict(saved, model.cfg)
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    reloaded = hf_class(model.cfg).from_pretrained(tmp_path)
    assert torch.equal(reloaded.cls.predictions.decoder.bias, model.lm_head.decoder.bias)
    assert reloaded.cls.predictions.decoder.weight is reloaded.bert.embeddings.word_embeddings.weight


def test_wrong_keys_and_broken_ties_are_one_clear_error(pair):
    model, _ = pair
    state = model.state_dict()
    bad = {k: v for k, v in state.items() if not k.startswith("layers.3.")}
    bad["pooler.dense.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match=r"missing keys: layers\.3\..*and 11 more.*unexpected keys: pooler\.dense"):
        to_hf_state_dict(bad, model.cfg)
    hf_state = dict(to_hf_state_dict(state, model.cfg))
    hf_state["cls.predictions.decoder.bias"] = hf_state["cls.predictions.bias"] + 1
    with pytest.raises(UserError, match="cls.predictions.decoder.bias' differs"):
        from_hf_state_dict(hf_state, model.cfg)
    with pytest.raises(UserError, match=r"missing keys: bert\.encoder\.layer\.4\."):
        from_hf_state_dict(to_hf_state_dict(state, model.cfg), dataclasses.replace(model.cfg, num_layers=5))
    wide = dataclasses.replace(model.cfg, ffn_size=256)
    with pytest.raises(UserError, match=r"'bert\.encoder\.layer\.0\.intermediate\.dense\.weight' has shape \[512, 128\]"):
        from_hf_state_dict(to_hf_state_dict(state, model.cfg), wide)


def test_logits_at_masked_positions_match(pair, data):
    model, hf = pair
    model.eval(), hf.eval()
    batch = data.collate(range(BATCH))
    assert (batch["attention_mask"] == 0).any()  # padding is present
    with torch.no_grad():
        ours = model.mlm_logits(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["mlm_positions"])
        full = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  token_type_ids=batch["token_type_ids"]).logits
    theirs = torch.gather(full, 1, batch["mlm_positions"][..., None].expand(-1, -1, full.shape[-1]))
    assert ours.shape == (BATCH, MAX_PRED, 1024)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_padding_idx_changes_no_gradient(pair, data):
    """HF's word embedding drops the lookup gradient of the pad row; ours need not: it is 0 anyway."""
    model, hf = pair
    batch = data.collate(range(BATCH))
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == SPECIAL.pad).all() and pad.sum() > 100
    assert hf.bert.embeddings.word_embeddings.padding_idx == SPECIAL.pad
    assert model.embeddings.word_embeddings.padding_idx is None

    embedded = []

    def keep(module, inputs, out):
        out.retain_grad()
        embedded.append(out)

    hook = model.embeddings.register_forward_hook(keep)
    ours_loss(model, batch).backward()
    hook.remove()
    hf_loss(hf, batch).backward()
    # Nothing reaches the hidden states of padded positions: masked keys, never predicted.
    assert torch.count_nonzero(embedded[0].grad[pad]) == 0
    ours_grad = model.embeddings.word_embeddings.weight.grad
    theirs_grad = hf.bert.embeddings.word_embeddings.weight.grad
    # The pad row still learns through the tied decoder (it is a softmax class), equally in both.
    assert ours_grad[SPECIAL.pad].abs().sum() > 0
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=0, atol=1e-6)


def test_twenty_training_steps_match(pair, data):
    model, hf = pair
    cfg = TrainConfig(steps=STEPS, lr=2e-3, warmup_steps=2, weight_decay=0.01, eps=1e-6, clip_grad=1.0)
    opts = [
        torch.optim.AdamW(param_groups(m, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        for m in (model, hf)
    ]
    assert [len(g["params"]) for g in opts[0].param_groups] == [len(g["params"]) for g in opts[1].param_groups]
    losses = []
    for step in range(STEPS):
        batch = data.collate(range(step * BATCH, (step + 1) * BATCH))
        row = []
        for m, opt, loss_fn in ((model, opts[0], ours_loss), (hf, opts[1], hf_loss)):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss = loss_fn(m, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), cfg.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            row.append(loss.item())
        losses.append(row)
    losses = np.array(losses)
    assert losses[-1, 0] < losses[0, 0] - 1.0  # it trains (6.97 -> 4.54)
    np.testing.assert_allclose(losses[:, 0], losses[:, 1], rtol=0, atol=1e-5)
    # The weights followed the same path, the pad row and the tied head included.
    final = from_hf_state_dict(hf.state_dict(), model.cfg)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, final[name], rtol=0, atol=1e-5, msg=name)


def test_fused_mlm_loss_matches_hf(pair, data):
    """model.fused_kernels: the head hands its transformed states to the MLM objective, whose loss
    decodes them chunk by chunk with the tied decoder (kernels.linear_cross_entropy); loss and
    gradients (the tied word embedding and the decoder bias included) equal transformers' own."""
    from rapidnlp.config import Config
    from rapidnlp.pretrain.mlm import MLM

    model, hf = pair
    cfg = dataclasses.replace(model.cfg, fused_kernels=True)
    objective = MLM(Config(model=cfg), 1.0)
    fused = BertForMLM(cfg, objective.pieces())
    fused.load_state_dict(model.state_dict())
    batch = data.collate(range(BATCH))
    inputs = (batch["input_ids"], batch["attention_mask"], *(batch[k] for k in fused.field_names))
    features = fused(*inputs)[0]
    assert features.shape == (BATCH, MAX_PRED, model.cfg.hidden_size)
    loss = objective.loss_sum({"lm_head": features}, batch) / objective.normaliser(batch)
    loss.backward()
    want = hf_loss(hf, batch)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    ours, theirs = dict(fused.named_parameters()), dict(hf.named_parameters())
    for name, hf_name in (("embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"),
                          ("lm_head.decoder.bias", "cls.predictions.bias"),
                          ("lm_head.dense.weight", "cls.predictions.transform.dense.weight"),
                          ("layers.0.mlp.fc1.weight", "bert.encoder.layer.0.intermediate.dense.weight")):
        torch.testing.assert_close(ours[name].grad, theirs[hf_name].grad, rtol=1e-5, atol=1e-6, msg=name)
