"""Online distillation: the draft keeps learning from the target on live traffic."""
