"""`kd` (distillation into a small student), `metakd-teacher` and `metakd` (Meta-KD, two stages).

KD (Hinton et al. 2015; TinyBERT, Jiao et al. 2020): the student is a `cls` model on a fresh,
smaller BERT built from a config (for example 4 layers x 312) with the teacher's tokenizer. Its loss
per example is alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * CE(hard label)
plus `layer_weight` x the MSE between each student layer (through a learned projection) and the
teacher layer at the same relative depth, both on the plain [CLS] text [SEP] input. The transfer
set may be augmented by masking 15% of a text's tokens and filling them from the teacher's MLM.

Meta-KD (Pan et al. 2021): the meta-teacher is a `cls` model trained on several domains with
example weights t_i = 1/2 [cos(h_i, c_{d_i}) + mean_{d != d_i} cos(h_i, c_d)] (c_d the domain
prototypes, the mean [CLS] state of a domain, refreshed each epoch) plus `domain_weight` x a
domain-corruption term (cross-entropy of a domain head against the uniform distribution over
domains, i.e. against randomly corrupted domain labels in expectation), which keeps the features
domain-transferable. Meta-distillation weighs each example's KD and layer losses by
lambda_i = (1 + t_i) / (1 + exp((1 - p_T(y_i | x_i))^2)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rapidnlp.errors import UserError
from rapidnlp.finetune import losses
from rapidnlp.finetune.methods.base import Method
from rapidnlp.finetune.methods.cls import ClsMethod
from rapidnlp.finetune.model import MaskedLM


def build_student(teacher_lm: MaskedLM, layers: int, hidden: int, heads: int = 0) -> MaskedLM:
    from transformers import BertConfig, BertForMaskedLM

    t = teacher_lm.config
    heads = heads or (12 if hidden % 12 == 0 else 4)
    if hidden % heads:
        raise UserError(f"student hidden size {hidden} is not divisible by {heads} heads (--student-heads)")
    config = BertConfig(vocab_size=t.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=t.max_position_embeddings,
                        type_vocab_size=getattr(t, "type_vocab_size", 2), pad_token_id=getattr(t, "pad_token_id", 0))
    return MaskedLM(BertForMaskedLM(config))


@torch.no_grad()
def augment(teacher: Method, examples, copies: int, prob: float = 0.15, seed: int = 0):
    """`copies` variants of each example: 15% of its text tokens masked and refilled by sampling
    from the teacher's MLM; variants carry no label (the teacher's soft labels teach them)."""
    from rapidnlp.finetune.data import Example
    from rapidnlp.finetune.prompts import encode_pairs

    gen = torch.Generator().manual_seed(seed)
    tok, out = teacher.tok, []
    for _ in range(copies):
        for i in range(0, len(examples), 32):
            batch = examples[i:i + 32]
            enc = encode_pairs(tok, [e.text for e in batch], [None] * len(batch), teacher.max_len)
            special = (enc.ids == tok.cls_token_id) | (enc.ids == tok.sep_token_id) | (enc.mask == 0)
            pick = (torch.rand(enc.ids.shape, generator=gen) < prob) & ~special
            masked = torch.where(pick, torch.full_like(enc.ids, tok.mask_token_id), enc.ids)
            logits = teacher.lm.mlm_logits(teacher.lm.encode(masked, enc.mask, enc.types)[pick])
            logits[:, [tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, tok.pad_token_id or 0]] = -1e9
            filled = enc.ids.clone()
            filled[pick] = torch.multinomial(F.softmax(logits, -1), 1, generator=gen).squeeze(1)
            for row, e, m in zip(filled, batch, enc.mask):
                text = tok.decode(row[m.bool()][1:-1], skip_special_tokens=True)
                out.append(Example(text.replace(" ", "") if " " not in e.text else text, e.text_b, None, e.domain))
    return out


class Distiller(Method):
    """Trains `student` (a ClsMethod) from a frozen teacher method; saves as the student."""

    name = "kd"

    def __init__(self, teacher: Method, student: ClsMethod, options: dict):
        nn.Module.__init__(self)
        self.teacher, self.student = teacher.eval(), student
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.lm, self.tok, self.labels, self.options = student.lm, student.tok, student.labels, student.options
        self.temperature = float(options.get("temperature", 1.0))
        self.alpha = float(options.get("alpha", 0.5))
        self.layer_weight = float(options.get("layer_weight", 0.0))
        s_layers, t_layers = student.lm.config.num_hidden_layers, teacher.lm.config.num_hidden_layers
        # student layer i (1-based) learns from the teacher layer at the same relative depth
        self.layer_map = [round(i * t_layers / s_layers) for i in range(1, s_layers + 1)]
        self.proj = nn.ModuleList(nn.Linear(student.lm.hidden_size, teacher.lm.hidden_size)
                                  for _ in self.layer_map) if self.layer_weight else None

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains, nor drops out
        return self

    def example_weights(self, examples, teacher_logits, teacher_cls) -> torch.Tensor:
        return torch.ones(len(examples))

    def loss(self, examples):
        s_logits, _, s_layers, enc = self.student.forward_all(examples)
        with torch.no_grad():
            t_logits = self.teacher.logits(examples)
            t_last, t_layers = self.teacher.lm.encode(enc.ids, enc.mask, enc.types, all_layers=True)
        per = losses.kd_loss(s_logits, t_logits, self.student.label_tensor(examples), self.temperature,
                             self.alpha, reduce=False)
        if self.proj is not None:
            mask = enc.mask.float()
            for proj, i, j in zip(self.proj, range(1, len(self.layer_map) + 1), self.layer_map):
                per = per + self.layer_weight * losses.hidden_mse(proj(s_layers[i]), t_layers[j], mask)
        return (self.example_weights(examples, t_logits, t_last[:, 0]) * per).mean()

    def logits(self, examples):
        return self.student.logits(examples)

    def saved(self) -> Method:
        return self.student


class MetaTeacher(ClsMethod):
    name = "metakd-teacher"

    def __init__(self, lm, tok, labels, options):
        super().__init__(lm, tok, labels, options)
        self.domains = list(options.get("domains") or [])
        if len(self.domains) < 2:
            raise UserError("--method metakd-teacher needs training data from two or more domains "
                            "(a 'domain' field on every row)")
        self.domain_weight = float(options.get("domain_weight", 0.1))
        self.domain_head = nn.Linear(lm.hidden_size, len(self.domains))
        self.register_buffer("prototypes", torch.zeros(len(self.domains), lm.hidden_size))

    def domain_tensor(self, examples) -> torch.Tensor:
        unknown = sorted({e.domain for e in examples if e.domain not in self.domains}, key=str)
        if unknown:
            raise UserError(f"domain(s) {unknown} not among the teacher's {self.domains}")
        return torch.tensor([self.domains.index(e.domain) for e in examples])

    @torch.no_grad()
    def before_epoch(self, examples):
        was = self.training
        self.eval()
        cls = torch.cat([self.forward_all(examples[i:i + 32])[1] for i in range(0, len(examples), 32)])
        self.prototypes = losses.domain_prototypes(cls, self.domain_tensor(examples), len(self.domains))
        self.train(was)

    def transferability(self, cls_states, examples) -> torch.Tensor:
        return losses.transferability(cls_states, self.domain_tensor(examples), self.prototypes)

    def loss(self, examples):
        logits, cls, _, _ = self.forward_all(examples)
        t = self.transferability(cls.detach(), examples)
        ce = F.cross_entropy(logits, self.label_tensor(examples), reduction="none")
        corruption = -F.log_softmax(self.domain_head(cls), -1).mean(-1)  # CE against uniform domains
        return (t * ce).mean() + self.domain_weight * corruption.mean()


class MetaDistiller(Distiller):
    name = "metakd"

    def __init__(self, teacher: MetaTeacher, student: ClsMethod, options: dict):
        if not isinstance(teacher, MetaTeacher):
            raise UserError("--method metakd distils a meta-teacher: give --model a folder written by "
                            "`rapidnlp finetune --method metakd-teacher`")
        super().__init__(teacher, student, options)

    def example_weights(self, examples, teacher_logits, teacher_cls):
        domains = torch.tensor([self.teacher.domains.index(e.domain) if e.domain in self.teacher.domains else -1
                                for e in examples])
        # augmented or unlabelled text without a known domain: its nearest prototype's
        nearest = F.cosine_similarity(teacher_cls[:, None], self.teacher.prototypes[None], dim=-1).argmax(-1)
        domains = torch.where(domains >= 0, domains, nearest)
        t = losses.transferability(teacher_cls, domains, self.teacher.prototypes)
        probs = F.softmax(teacher_logits, -1)
        labels = self.student.label_tensor(examples)
        p_true = torch.where(labels >= 0, probs.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), probs.max(-1).values)
        return losses.metakd_weights(t, p_true)
