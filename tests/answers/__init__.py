"""Right and wrong answers to every exercise, one module per chapter."""
