"""finetune/losses.py against hand computations on tiny tensors: PET's multi-token label scores,
Fuzzy-PET's sums, CP-Tuning's contrastive loss on a 4-example batch, KD at T = 1 and T = 4,
MetaKD's transferability t_i and weights lambda_i."""
import math

import pytest
import torch

from rapidnlp.finetune import losses


def test_pet_scores_multi_token_words_are_mean_log_probs():
    # two [MASK] slots over a vocabulary of 4; probabilities written out
    p = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]])
    words = torch.tensor([[1, 0], [3, 3]])  # word A = tokens (1, 0), word B = tokens (3, 3)
    got = losses.word_scores(p.log(), words)
    want = [(math.log(0.2) + math.log(0.4)) / 2, (math.log(0.4) + math.log(0.1)) / 2]
    assert got[0].tolist() == pytest.approx(want, abs=1e-6)


def test_pet_one_word_per_label_is_the_word_score():
    scores = torch.tensor([[-1.0, -2.0], [-3.0, -0.5]])
    got = losses.label_scores(scores, torch.tensor([0, 1]), 2)
    assert torch.equal(got, scores)
    ce = torch.nn.functional.cross_entropy(got, torch.tensor([0, 1])).item()
    want = -(math.log(math.exp(-1) / (math.exp(-1) + math.exp(-2)))
             + math.log(math.exp(-0.5) / (math.exp(-3) + math.exp(-0.5)))) / 2
    assert ce == pytest.approx(want, abs=1e-6)


def test_fuzzy_pet_label_probability_is_the_sum_of_its_words():
    # word probabilities (already normalised over the three words): label 0 owns words 0 and 2
    word_p = torch.tensor([[0.2, 0.5, 0.3]])
    labels = losses.label_scores(word_p.log(), torch.tensor([0, 1, 0]), 2)
    assert labels.softmax(-1)[0].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    assert labels[0, 0].item() == pytest.approx(math.log(0.2 + 0.3), abs=1e-6)


def test_cp_tuning_contrastive_loss_closed_form():
    # unit features: cos(0,1) = 0.6, cos(2,3) = 0 (positives); cos(0,2) = 0, cos(0,3) = -1,
    # cos(1,2) = 0.8, cos(1,3) = -0.6 (negatives)
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    for gamma in (1.0, 64.0):
        m = 0.4
        # positives: a_p = relu(1 + m - s), logit = -gamma a_p (s - (1 - m))
        lp = [-gamma * 0.8 * (0.6 - 0.6), -gamma * 1.4 * (0.0 - 0.6)]
        # negatives: a_n = relu(s + m), logit = gamma a_n (s - m); s = -1 and -0.6 give a_n = 0
        ln = [gamma * 0.4 * (0.0 - 0.4), 0.0, gamma * 1.2 * (0.8 - 0.4), 0.0]
        lse = lambda xs: max(xs) + math.log(sum(math.exp(x - max(xs)) for x in xs))  # noqa: E731
        z = lse(ln) + lse(lp)
        want = max(z, 0) + math.log1p(math.exp(-abs(z)))  # softplus
        assert losses.circle_loss(f, y, m, gamma).item() == pytest.approx(want, rel=1e-5)
    # the value at gamma = 1, written out: softplus(log(e^-0.16 + 2 + e^0.48) + log(1 + e^0.84))
    assert losses.circle_loss(f, y, 0.4, 1.0).item() == pytest.approx(
        math.log1p((math.exp(-0.16) + 2 + math.exp(0.48)) * (1 + math.exp(0.84))), rel=1e-6)


def test_cp_tuning_loss_without_negative_pairs_is_zero():
    f = torch.randn(3, 4)
    assert losses.circle_loss(f, torch.tensor([1, 1, 1])).item() == 0.0


@pytest.mark.parametrize("t", [1.0, 4.0])
def test_kd_loss_by_hand(t):
    s = torch.tensor([[1.0, 0.0, -1.0]])
    te = torch.tensor([[2.0, 0.5, 0.0]])
    alpha = 0.7

    def softmax(v):
        e = [math.exp(x / t) for x in v]
        return [x / sum(e) for x in e]

    ps, pt = softmax(s[0].tolist()), softmax(te[0].tolist())
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    ce = -math.log(math.exp(1.0) / sum(math.exp(x) for x in s[0].tolist()))
    want = alpha * t * t * kl + (1 - alpha) * ce
    got = losses.kd_loss(s, te, torch.tensor([0]), temperature=t, alpha=alpha)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # no hard label (-1): only the soft term
    got = losses.kd_loss(s, te, torch.tensor([-1]), temperature=t, alpha=alpha)
    assert got.item() == pytest.approx(alpha * t * t * kl, rel=1e-4)


def test_metakd_transferability_and_weights_by_hand():
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    d = torch.tensor([0, 1, 0])
    protos = losses.domain_prototypes(h, d, 3)
    # domain 0: mean of (1,0) and (1,1) = (1, .5); domain 1: (0, 1); domain 2 has no example: (0, 0)
    assert protos.tolist() == [[1.0, 0.5], [0.0, 1.0], [0.0, 0.0]]
    protos = torch.tensor([[1.0, 0.5], [0.0, 1.0], [1.0, -1.0]])
    t = losses.transferability(h, d, protos)
    c = lambda a, b: (a[0] * b[0] + a[1] * b[1]) / math.hypot(*a) / math.hypot(*b)  # noqa: E731
    P = protos.tolist()
    want = [0.5 * (c((1, 0), P[0]) + (c((1, 0), P[1]) + c((1, 0), P[2])) / 2),
            0.5 * (c((0, 1), P[1]) + (c((0, 1), P[0]) + c((0, 1), P[2])) / 2),
            0.5 * (c((1, 1), P[0]) + (c((1, 1), P[1]) + c((1, 1), P[2])) / 2)]
    assert t.tolist() == pytest.approx(want, abs=1e-6)
    p_true = torch.tensor([0.9, 0.5, 0.1])
    lam = losses.metakd_weights(t, p_true)
    assert lam.tolist() == pytest.approx(
        [(1 + ti) / (1 + math.exp((1 - p) ** 2)) for ti, p in zip(want, [0.9, 0.5, 0.1])], abs=1e-6)


def test_mlm_loss_ignores_unmasked_and_is_zero_without_masks():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    targets = torch.tensor([[0, -100]])
    assert losses.mlm_loss(logits, targets).item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)))
    assert losses.mlm_loss(logits, torch.full((1, 2), -100)).item() == 0.0
