"""The encoder with `model.fused_kernels = true` against the unfused encoder: same parameters and
state_dict keys, same loss and gradients (fp32, 1e-5) over a few AdamW steps, with the Triton
kernels really launched (through the interpreter, TRITON_INTERPRET=1)."""
import kernels_env  # noqa: F401  (first: sets TRITON_INTERPRET before triton is imported)

import dataclasses

import pytest
import torch

from kernels_env import assert_launched, kernels, needs_triton
from rapidnlp.config import ModelConfig
from rapidnlp.model.bert import BertForMLM
from rapidnlp.pretrain.mlm import mlm_loss_sum

pytestmark = [needs_triton, pytest.mark.timeout(120)]

CFG = ModelConfig(num_layers=2, hidden_size=64, num_heads=4, ffn_size=200, vocab_size=300,
                  max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)


def batch(seed: int, b: int = 2, s: int = 16, predictions: int = 4) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([s, s - 5])
    attention_mask = (torch.arange(s)[None, :] < lengths[:, None]).long()
    positions = torch.stack([torch.randperm(int(n), generator=g)[:predictions] for n in lengths])
    labels = torch.randint(0, CFG.vocab_size, (b, predictions), generator=g)
    labels[1, -1] = -100  # a padded prediction slot
    return {
        "input_ids": torch.randint(0, CFG.vocab_size, (b, s), generator=g),
        "token_type_ids": (torch.arange(s) >= s // 2).long().expand(b, s).contiguous(),
        "attention_mask": attention_mask,
        "mlm_positions": positions,
        "mlm_labels": labels,
    }


def build(cfg: ModelConfig) -> BertForMLM:
    torch.manual_seed(1234)
    return BertForMLM(cfg)


def train(model: BertForMLM, steps: int, fused_loss: bool) -> list[tuple[float, dict]]:
    """Per step: the loss and the gradients, then an AdamW step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for step in range(steps):
        b = batch(step)
        torch.manual_seed(100 + step)  # the same dropout seeds for both models
        logits = model.mlm_logits(b["input_ids"], b["token_type_ids"], b["attention_mask"], b["mlm_positions"])
        if fused_loss:
            loss = kernels.cross_entropy(logits, b["mlm_labels"], reduction="sum")
        else:
            loss = mlm_loss_sum(logits, b["mlm_labels"])
        loss.backward()
        history.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return history


def assert_same_training(got, want):
    for step, ((loss, grads), (ref_loss, ref_grads)) in enumerate(zip(got, want)):
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-5), f"step {step}"
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name, s=step: f"step {s}, {n}: {m}")


def test_fused_encoder_matches_unfused():
    kernels.reset_launch_counts()
    fused_cfg = dataclasses.replace(CFG, fused_kernels=True)
    unfused, fused = build(CFG), build(fused_cfg)
    assert list(fused.state_dict()) == list(unfused.state_dict())  # checkpoints and HF mapping unaffected
    for (n, p), (m, q) in zip(fused.named_parameters(), unfused.named_parameters()):
        assert n == m and torch.equal(p, q), n

    assert_same_training(train(fused, 3, fused_loss=True), train(unfused, 3, fused_loss=False))
    assert_launched("layer_norm_fwd", "layer_norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd",
                    "bias_dropout_add_fwd", "cross_entropy_fwd", "cross_entropy_bwd")
    # a fused checkpoint loads into the unfused model and back, strictly
    unfused.load_state_dict(fused.state_dict())
    fused.load_state_dict(unfused.state_dict())


def test_fused_encoder_dropout_triton_equals_reference():
    """With residual dropout on, the Triton path (Philox in the kernel) and the reference path
    (the same Philox in torch) train identically: the fused model's dropout is a defined
    function of torch's seed, whichever path runs it."""
    cfg = dataclasses.replace(CFG, fused_kernels=True, dropout=0.1)
    kernels.reset_launch_counts()
    triton_run = train(build(cfg), 2, fused_loss=True)
    assert_launched("bias_dropout_add_fwd", "bias_dropout_add_bwd")
    counts = kernels.launch_counts()
    with kernels.reference_only():
        reference_run = train(build(cfg), 2, fused_loss=True)
    assert kernels.launch_counts() == counts  # the reference run launched nothing
    assert_same_training(triton_run, reference_run)


def mlm_model(cfg: ModelConfig):
    """The model built as the trainer builds it (the MLM objective's piece), and the objective."""
    from rapidnlp.config import Config
    from rapidnlp.pretrain.mlm import MLM

    objective = MLM(Config(model=cfg), 1.0)
    torch.manual_seed(1234)
    return BertForMLM(cfg, objective.pieces()), objective


def objective_step(model, objective, b: dict):
    """The MLM objective's loss sum, its gradients, and its evaluation metric, on one batch."""
    inputs = (b["input_ids"], b["attention_mask"], *(b[k] for k in model.field_names))
    outputs = dict(zip(model.head_names, model(*inputs)))
    loss = objective.loss_sum(outputs, b)
    loss.backward()
    with torch.no_grad():
        metrics = objective.metrics(dict(zip(model.head_names, model(*inputs))), b)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads, outputs["lm_head"].shape, metrics["accuracy"]


def test_fused_linear_cross_entropy_is_the_mlm_loss():
    """fused_kernels: the head returns [b, P, h] states and the objective's loss decodes them in
    chunks (the Triton cross-entropy kernels); loss, every gradient (the tied word embedding's
    included) and the accuracy metric equal the unfused model's logits + F.cross_entropy."""
    cfg = dataclasses.replace(CFG, vocab_size=1000)  # 1024 rows: several chunks of 4 x 7 tokens
    unfused, fused = mlm_model(cfg), mlm_model(dataclasses.replace(cfg, fused_kernels=True))
    b = batch(0)
    b["mlm_labels"] = torch.randint(0, 1000, b["mlm_labels"].shape, generator=torch.Generator().manual_seed(3))
    b["mlm_labels"][1, -1] = -100
    want = objective_step(*unfused, b)
    kernels.reset_launch_counts()
    got = objective_step(*fused, b)
    assert_launched("cross_entropy_fwd", "cross_entropy_bwd")
    assert want[2] == (2, 4, 1024) and got[2] == (2, 4, CFG.hidden_size)  # logits vs transformed states
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-5, msg=name)
    assert [float(x) for x in got[3]] == [float(x) for x in want[3]]
    # mlm_logits (conversion, reference checks) still gives the logits of a fused model
    model = fused[0]
    logits = model.mlm_logits(b["input_ids"], b["token_type_ids"], b["attention_mask"], b["mlm_positions"])
    assert logits.shape == (2, 4, 1024)


def test_fused_mlm_loss_needs_a_quarter_of_the_memory():
    """Peak bytes allocated by loss + backward, 2,048 masked tokens x 4,096 rows x 64 hidden: the
    unfused loss holds the logits, their log-softmax and their gradient (3 x 32 MiB); the fused
    one a chunk of logits and the gradients of hidden states and decoder. The reference path: the
    chunking, not Triton, decides the memory (scripts/bench_memory.py measures the full size)."""
    from rapidnlp.pretrain.mlm import decoder_loss_sum, mlm_loss_sum
    from rapidnlp.train.memory import AllocationPeak

    g = torch.Generator().manual_seed(0)
    decoder = torch.nn.Linear(64, 4096)
    features = torch.randn(4, 512, 64, generator=g, requires_grad=True)
    labels = torch.randint(0, 4096, (4, 512), generator=g)
    labels[:, ::5] = -100
    peaks, losses = {}, {}
    with kernels.reference_only():
        for fused in (False, True):
            counter = AllocationPeak()
            with counter.track():
                loss = decoder_loss_sum(features, decoder, labels) if fused else mlm_loss_sum(decoder(features), labels)
                loss.backward()
            peaks[fused], losses[fused] = counter.bytes, loss.item()
    assert peaks[False] >= 3 * 4 * 2048 * 4096
    assert peaks[True] <= peaks[False] / 4, peaks
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
