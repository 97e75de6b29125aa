"""Evaluation: the ``evaluate.py`` entry point (``evaluate.py``) and the tasks it runs, each a
callable that takes ``output_dir`` and returns metrics (``training_set.py``, ``autoencoder.py``;
catalog runs are :func:`sedvae.catalog.run.run_catalog`)."""
