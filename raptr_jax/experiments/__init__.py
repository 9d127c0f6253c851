"""Self-contained paper experiments (not language-model pretraining runs)."""
