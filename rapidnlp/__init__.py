"""RapidNLP: a distributed pretraining engine for BERT-style masked-LM encoders."""

__version__ = "0.1.0"
