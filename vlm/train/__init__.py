"""Training: recipes, freeze policy, data pipeline, the DeepSpeed loop and its launcher."""
