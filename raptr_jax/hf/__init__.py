"""transformers checkpoints in and out: ``python -m raptr_jax.hf import|export`` (``commands.py``),
the architecture table (``architectures.py``), tensor I/O (``tensors.py``), conversion onto the
mesh (``convert.py``) and SentencePiece vocabularies as ``tokenizer.json`` (``tokenizer.py``).
Neither torch nor transformers is needed (safetensors and the config JSON are enough; a
``pytorch_model.bin`` needs torch, read tensors-only)."""
