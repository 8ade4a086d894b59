"""Language models: the registry and loading, prompts, batched forward passes, classification and baselines."""
