"""Downstream evaluation: the data (``fetch``, ``tasks``), continuation scoring (``scoring``),
zero- / few-shot metrics (``zero_shot``), fine-tuning (``finetune``) and generation
(``generate``); the commands are ``python -m raptr_jax.evaluate`` and ``python -m raptr_jax.generate``."""
