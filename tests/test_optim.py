"""The optimizer builder: AdamW's fused CPU kernel (train.fused_adamw) against the unfused step."""
import dataclasses

import torch

from rapidnlp.config import ModelConfig, TrainConfig
from rapidnlp.model.bert import BertForMLM
from rapidnlp.optim import build_optimizer


def _train(fused: bool, steps: int = 5) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = BertForMLM(ModelConfig(vocab_size=300, hidden_size=64, num_heads=2, ffn_size=128, num_layers=2,
                                   max_position_embeddings=32, norm_position="post"))
    opt = build_optimizer(model, dataclasses.replace(TrainConfig(), lr=3e-3, fused_adamw=fused))
    assert opt.defaults["fused"] is (True if fused else None)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(5, 300, (4, 32), generator=gen)
        positions = torch.randint(1, 31, (4, 5), generator=gen)
        logits = model.mlm_logits(ids, torch.zeros_like(ids), torch.ones_like(ids), positions)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.gather(ids, 1, positions).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model.state_dict()


def test_fused_adamw_on_cpu_matches_the_unfused_step():
    plain, plain_state = _train(False)
    fused, fused_state = _train(True)
    assert plain[-1] < plain[0] - 0.05  # it trains
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(plain), rtol=1e-5, atol=1e-5)
    for name, value in plain_state.items():
        torch.testing.assert_close(fused_state[name], value, rtol=1e-4, atol=1e-6, msg=name)
