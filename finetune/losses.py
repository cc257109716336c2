"""The finetuning losses and scores as plain functions of tensors (formulas in the README).

Everything here is pure tensor math, so that each can be checked against a hand computation on
tiny tensors (tests/test_finetune_losses.py). Nothing here tokenizes or runs a model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def word_scores(mask_log_probs: torch.Tensor, word_ids: torch.Tensor) -> torch.Tensor:
    """PET's score of n-token label words: the mean over the n [MASK] slots of log p(token_j | slot j).

    mask_log_probs: (B, n, V) log-softmax of the MLM logits at the n mask slots;
    word_ids: (W, n) the words' token ids. Returns (B, W).
    """
    n = word_ids.shape[1]
    slot = torch.arange(n, device=word_ids.device)
    picked = mask_log_probs[:, slot.unsqueeze(0), word_ids]  # (B, W, n)
    return picked.mean(dim=-1)


def label_scores(scores: torch.Tensor, word_label: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Fuzzy-PET: a label's score is log sum_w exp(score_w) over its words, so that after a softmax
    over labels its probability is the sum of its words' probabilities. One word per label: PET.

    scores: (B, W); word_label: (W,) label index of each word. Returns (B, C).
    """
    out = scores.new_full((scores.shape[0], num_labels), -math.inf)
    for c in range(num_labels):
        out[:, c] = torch.logsumexp(scores[:, word_label == c], dim=-1)
    return out


def circle_loss(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.4, gamma: float = 64.0,
                cost: torch.Tensor | None = None) -> torch.Tensor:
    """CP-Tuning's pair-wise cost-sensitive contrastive loss, in circle-loss form.

    Over all pairs i < j of the batch with s_ij = cos(f_i, f_j):
      positive pairs (same label): a_p = relu(1 + m - s), logit_p = -gamma * a_p * (s - (1 - m))
      negative pairs:              a_n = relu(s + m),     logit_n =  gamma * a_n * (s - m)
      loss = softplus(logsumexp(logit_n) + logsumexp(logit_p))
    `cost` (C, C), optional: a negative pair of labels (y_i, y_j) has its logit scaled by
    cost[y_i, y_j] (the cost-sensitive weighting; all ones = plain circle loss).
    A batch without positive or without negative pairs gives 0.
    """
    f = F.normalize(features, dim=-1)
    sim = f @ f.T
    i, j = torch.triu_indices(len(f), len(f), offset=1, device=f.device)
    s = sim[i, j]
    same = labels[i] == labels[j]
    if same.all() or not same.any():
        return features.sum() * 0.0
    sp, sn = s[same], s[~same]
    logit_p = -gamma * torch.relu(1 + margin - sp).detach() * (sp - (1 - margin))
    logit_n = gamma * torch.relu(sn + margin).detach() * (sn - margin)
    if cost is not None:
        logit_n = logit_n * cost[labels[i][~same], labels[j][~same]]
    return F.softplus(torch.logsumexp(logit_n, 0) + torch.logsumexp(logit_p, 0))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
            temperature: float = 1.0, alpha: float = 1.0, reduce: bool = True) -> torch.Tensor:
    """Hinton distillation: alpha * T^2 * KL(p_T^(T) || p_S^(T)) + (1 - alpha) * CE(p_S, y).

    labels: (B,) with -1 for examples without a hard label (their CE term is 0).
    reduce=False returns the per-example losses (B,) (MetaKD weights them).
    """
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                    log_target=True, reduction="none").sum(-1) * t * t
    loss = alpha * soft
    if labels is not None and alpha < 1:
        hard = F.cross_entropy(student_logits, labels.clamp(min=0), reduction="none")
        loss = loss + (1 - alpha) * hard * (labels >= 0)
    return loss.mean() if reduce else loss


def domain_prototypes(hidden: torch.Tensor, domains: torch.Tensor, num_domains: int) -> torch.Tensor:
    """c_d = the mean hidden state of domain d's examples: (D, H)."""
    protos = hidden.new_zeros(num_domains, hidden.shape[-1])
    protos.index_add_(0, domains, hidden)
    counts = torch.bincount(domains, minlength=num_domains).clamp(min=1).to(hidden.dtype)
    return protos / counts[:, None]


def transferability(hidden: torch.Tensor, domains: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Meta-KD: t_i = 1/2 [cos(h_i, c_{d_i}) + mean_{d != d_i} cos(h_i, c_d)]. (B,)"""
    cos = F.cosine_similarity(hidden[:, None, :], prototypes[None, :, :], dim=-1)  # (B, D)
    own = cos.gather(1, domains[:, None]).squeeze(1)
    num = prototypes.shape[0]
    others = (cos.sum(1) - own) / max(num - 1, 1)
    return 0.5 * (own + others)


def metakd_weights(t: torch.Tensor, p_true: torch.Tensor) -> torch.Tensor:
    """Meta-distillation weights: lambda_i = (1 + t_i) / (1 + exp((1 - p_T(y_i | x_i))^2))."""
    return (1 + t) / (1 + torch.exp((1 - p_true) ** 2))


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-example MSE between (projected) student and teacher hidden states over real tokens. (B,)"""
    err = ((student - teacher) ** 2).mean(-1) * mask
    return err.sum(-1) / mask.sum(-1).clamp(min=1)


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the masked positions (targets -100 elsewhere); 0 when none is masked."""
    if (targets != -100).any():
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
    return logits.sum() * 0.0
