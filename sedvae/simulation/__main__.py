"""``python -m sedvae.simulation n=... seed=... [nebular=true] [out=...]`` (also the console
script ``sedvae-simulate``): write a rest-frame simulated set (``conf/simulate.yaml``)."""

from __future__ import annotations

import logging

log = logging.getLogger("sedvae.simulation")


def main() -> None:
    import hydra

    from ..paths import config_dir

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="simulate")
    def _run(cfg) -> None:
        from ..hydra_utils import output_dir
        from .writer import simulate_to_hdf5

        path = simulate_to_hdf5(
            cfg.out,
            n=cfg.n,
            seed=cfg.seed,
            chunk_size=cfg.chunk_size,
            z_min=cfg.z_min,
            z_max=cfg.z_max,
            nebular=cfg.nebular,
            logu_range=tuple(cfg.logu_range),
            sigma_v_range=tuple(cfg.sigma_v_range),
            progress=cfg.progress,
            overwrite=cfg.overwrite,
            compile=cfg.compile,
        )
        log.info("training set: %s", path)
        if cfg.plot:
            import matplotlib

            matplotlib.use("Agg")
            from ..plotting.training_set import plot_training_examples

            fig, _ = plot_training_examples(path, n=cfg.plot_n)
            figure = output_dir(cfg) / "training_examples.png"
            fig.savefig(figure, dpi=110)
            log.info("figure: %s", figure)

    _run()


if __name__ == "__main__":
    main()
