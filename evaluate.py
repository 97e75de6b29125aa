"""Evaluate sedvae: ``python evaluate.py evaluation=<name> ...`` (see conf/evaluation/)."""

from sedvae.evaluation.evaluate import main

if __name__ == "__main__":
    main()
