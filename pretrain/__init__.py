"""Pretraining objectives (installed as rapidnlp.pretrain): plain MLM now, knowledge-injected objectives next."""
