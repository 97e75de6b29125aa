"""Training the flow alone on frozen summaries (``model.freeze_embedding``,
``experiment=posterior_flow``): the same loss as joint training, only the flow moves, and
summaries of another embedding are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from posterior_helpers import fake_batch, hydra_net, net_config

from sedvae.checkpoint import CheckpointError, save_checkpoint
from sedvae.posterior.data import SummaryBatches
from sedvae.posterior.lightning import PosteriorModule
from sedvae.posterior.summaries import summarise_batch
from sedvae.sps import PROVABGSPrior

pytestmark = pytest.mark.usefixtures("one_thread")


def batch_with_truth(b: int = 6, seed: int = 0) -> dict:
    batch = fake_batch(b, seed=seed)
    batch["theta"] = PROVABGSPrior().sample(b, torch.Generator().manual_seed(seed))
    return batch


@pytest.fixture
def trained_file(tmp_path):
    torch.manual_seed(0)
    net = hydra_net(net_config()).eval()
    return net, save_checkpoint(tmp_path / "p.pt", "posterior", net, net_config())


def frozen_module(path) -> PosteriorModule:
    return PosteriorModule(hydra_net(net_config()), optimizer=torch.optim.Adam,
                           init_from=str(path), freeze_embedding=True)  # fmt: skip


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_frozen_summary_loss_is_the_joint_loss(trained_file):
    """-log q(u | x) from a frozen summary (context, y, log|dy/du|) equals the joint loss on
    the raw batch, mass anchor and Gaussianised coordinates included: the flow trained alone
    fits the density the joint runs fit."""
    net, path = trained_file
    module = frozen_module(path).eval()
    batch = batch_with_truth()
    rows = SummaryBatches(summarise_batch(net, batch))[list(range(6))]
    with torch.no_grad():
        frozen = module.training_step(rows, 0)
        joint = net.loss(batch)[0]
    assert frozen.item() == pytest.approx(joint.item(), rel=1e-5)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_freeze_embedding_trains_the_flow_alone(trained_file):
    """Only flow weights reach the optimiser; steps on frozen summaries lower the loss on the
    raw batch and leave every other weight (summary network, anchor) bit-identical."""
    net, path = trained_file
    module = frozen_module(path)
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in module.net.flow.parameters())
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    batch = batch_with_truth(32, seed=1)
    rows = SummaryBatches(summarise_batch(net, batch))[list(range(32))]
    with torch.no_grad():
        start = module.net.loss(batch)[0].item()
    for _ in range(30):
        opt.zero_grad()
        module.training_step(rows, 0).backward()
        opt.step()
    with torch.no_grad():
        assert module.net.loss(batch)[0].item() < start - 0.5
    after = module.net.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("flow.") for k in moved)


def test_freeze_embedding_needs_a_trained_file_and_matching_summaries(trained_file, tmp_path):
    net, path = trained_file
    with pytest.raises(ValueError, match="model.init_from"):
        PosteriorModule(hydra_net(net_config()), optimizer=torch.optim.Adam, freeze_embedding=True)
    module = frozen_module(path)
    own = net.summary_state()
    module._check_frozen_summaries(own)  # the file's own embedding: accepted
    torch.manual_seed(5)
    other = hydra_net(net_config())
    theirs = other.summary_state()
    with pytest.raises(CheckpointError, match="summary_from"):
        module._check_frozen_summaries(theirs)
    joint = PosteriorModule(hydra_net(net_config()), optimizer=torch.optim.Adam,
                            init_from=str(path))  # fmt: skip
    with pytest.raises(ValueError, match="freeze_embedding"):
        joint._check_frozen_summaries(own)
    with pytest.raises(ValueError, match="freeze_embedding"):
        joint.training_step(SummaryBatches(summarise_batch(net, batch_with_truth()))[[0, 1]], 0)


def test_train_posterior_flow_fast_dev_run(tmp_path):
    """python train.py experiment=posterior_flow debug=fdr from a posterior file of the
    experiment's own network, on tiny mock files: summaries for every training galaxy and
    noise draw (the same for the same ``noise_seed``), then a flow step and a validation step
    on raw mocks."""
    import hydra
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sedvae.paths import config_dir
    from sedvae.posterior.data import FrozenSummaryDataModule
    from sedvae.train import train

    overrides = [
        "experiment=posterior_flow", "debug=fdr", f"paths.output_dir={tmp_path}",
        f"data.cache_dir={tmp_path}/mocks", "data.n_train=16", "data.train_seeds=[1]",
        "data.n_val=8", "data.n_test=8", "data.batch_size=8", "data.draws=2",
        "model.net.embedding.pca=0", f"model.init_from={tmp_path}/start.pt",
    ]  # fmt: skip
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
        torch.manual_seed(0)
        save_checkpoint(tmp_path / "start.pt", "posterior", hydra.utils.instantiate(cfg.model.net),
                       cfg.model.net)  # fmt: skip
        dm = hydra.utils.instantiate(cfg.data)
        assert isinstance(dm, FrozenSummaryDataModule) and dm.summary_from == cfg.model.init_from
        metrics = train(cfg)

        def contexts(**kwargs) -> torch.Tensor:
            dm = hydra.utils.instantiate(cfg.data, **kwargs)
            dm.setup("fit")
            return dm.datasets["train_summaries"].summaries["context"]

        first, again, other = contexts(), contexts(), contexts(noise_seed=2)
        # the trained model's augmentation, not the file's: every spectrum cut short
        assert dm.augment["p_cut_coverage"] == cfg.model.net.p_cut_coverage == 0.0
        cut = contexts(augment={**dm.augment, "p_cut_coverage": 1.0})
    GlobalHydra.instance().clear()
    assert np.isfinite(metrics["train/loss"]) and np.isfinite(metrics["val/loss"])
    # every galaxy x draw, reproducible; another noise_seed draws other noise
    assert first.shape[0] == 16 * 2
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert cut.shape == first.shape and not torch.allclose(first, cut)


def test_exported_file_counts_the_epochs_it_trained(tmp_path):
    """ExportCheckpoint's metadata: a 2-epoch run says 2 epochs (Lightning's current_epoch after
    fit counts completed epochs)."""
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from sedvae.checkpoint import ExportCheckpoint, load_checkpoint

    OmegaConf.save({"model": {"net": net_config()}}, tmp_path / "config.yaml")
    module = PosteriorModule(hydra_net(net_config()), optimizer=torch.optim.Adam)
    batches = [batch_with_truth(4, seed=s) for s in range(2)]
    trainer = pl.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[ExportCheckpoint("posterior", str(tmp_path / "p.pt"),
                                    str(tmp_path / "config.yaml"))],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    meta = load_checkpoint(tmp_path / "p.pt", "posterior")[0].meta["training"]
    assert meta["epochs"] == 2 and meta["global_step"] == 4


def test_posterior_flow_experiment_builds_the_shipped_files_network(tmp_path):
    """experiment=posterior_flow's default model.net is the shipped file's network, so the
    stage runs on the shipped file as configured: the module loads it with frozen embedding."""
    import hydra
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from sedvae.paths import config_dir, data_dir

    shipped = data_dir() / "posterior" / "posterior.pt"
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=posterior_flow",
                                          f"paths.output_dir={tmp_path}",
                                          f"model.init_from={shipped}"])  # fmt: skip
    GlobalHydra.instance().clear()
    module = hydra.utils.instantiate(cfg.model)  # refuses a file of another network
    assert module.freeze_embedding
    trainable = {n for n, p in module.net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("flow.") for n in trainable)
    assert bool(module.net.embedding.pca.fitted)  # the file's basis came with its weights
