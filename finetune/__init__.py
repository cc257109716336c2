"""Few-shot finetuning and distillation over a masked-LM (installed as rapidnlp.finetune)."""
