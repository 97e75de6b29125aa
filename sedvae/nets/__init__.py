"""Only ``checkpoint.py`` (the autoencoder's file format) is left here; the nets live in
:mod:`sedvae.autoencoder`."""
