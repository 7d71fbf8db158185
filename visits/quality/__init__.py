"""Output quality, measured: the evaluation set and comparisons of re-run batches."""
