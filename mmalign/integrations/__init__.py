"""mmalign inside other people's code: :mod:`.hf` (a Hugging Face model whose forward returns log-probs
through the fused op) and :mod:`.trl` (DAMOLoss and the fused log-probs inside TRL's ``DPOTrainer``)."""
