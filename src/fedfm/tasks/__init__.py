"""Tasks: turn examples into batches, compute the training loss, evaluate a model."""
