"""Train a sedvae model: ``python train.py experiment=<name>`` (see conf/experiment/)."""

from sedvae.train import main

if __name__ == "__main__":
    main()
