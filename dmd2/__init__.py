"""dmd2: DMD2 distillation on DeepSpeed ZeRO-3."""
