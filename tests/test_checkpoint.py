"""sedvae.checkpoint: one format for every kind, a loader that cannot be made to run code, clear
errors that name the file, an export from training runs and an upgrade of format-1 files."""

from __future__ import annotations

import builtins
import io

import hydra
import pytest
import torch

from sedvae.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    check_config,
    export,
    load_checkpoint,
    main,
    physics_fingerprint,
    read_torch_file,
    save_checkpoint,
    upgrade,
)

# a small network with a sedvae class as its target: the file format does not depend on it
FLOW = {"_target_": "sedvae.posterior.PosteriorFlow", "context": 4, "transforms": 1,
        "hidden": [8], "bins": 4}  # fmt: skip


def small_flow(seed: int = 0):
    torch.manual_seed(seed)
    return hydra.utils.instantiate(FLOW)


class WritesAFile:
    """A classic pickle payload: unpickling it calls ``open(path, "w")``, creating the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def crafted(path, config, kind="posterior"):
    """A format-2 header around ``config``, as a hostile file would be."""
    torch.save({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
                "config": config, "state_dict": {}, "meta": {}}, path)  # fmt: skip
    return path


def files(folder) -> set[str]:
    return {p.name for p in folder.rglob("*")}


# ---- code execution is refused ---------------------------------------------------------------
def torch_load_config(marker) -> dict:
    """torch.load on an inline torch file with weights_only False: unpickles the payload."""
    buffer = io.BytesIO()
    torch.save(WritesAFile(marker), buffer)
    payload = buffer.getvalue()
    return {"_target_": "torch.load", "weights_only": False,
            "f": {"_target_": "io.BytesIO", "_args_": [payload]}}  # fmt: skip


def savetxt_config(marker) -> dict:
    return {"_target_": "numpy.savetxt", "fname": str(marker), "X": [1.0, 2.0]}


@pytest.mark.parametrize(
    "make, target",
    [(torch_load_config, "torch.load"), (savetxt_config, "numpy.savetxt")],
)
def test_a_config_that_writes_a_file_is_refused_and_writes_nothing(tmp_path, make, target):
    # the attack is real: plain hydra.utils.instantiate of the config writes the file
    control = tmp_path / "control"
    control.mkdir()
    hydra.utils.instantiate(make(control / "pwned"))
    assert (control / "pwned").exists()

    work = tmp_path / "work"
    work.mkdir()
    path = crafted(work / "evil.pt", make(work / "pwned"))
    before = files(work)
    with pytest.raises(CheckpointError, match=rf"evil\.pt.*{target}"):
        load_checkpoint(path, "posterior")
    assert files(work) == before == {"evil.pt"}


@pytest.mark.parametrize(
    "config, named",
    [
        # nested inside an allowed class, through _args_ and _partial_
        ({**FLOW, "hidden": {"_target_": "numpy.savetxt", "_args_": ["{m}", [1.0]]}},
         "numpy.savetxt"),
        ({**FLOW, "hidden": {"_target_": "torch.load", "_partial_": True, "f": "{m}"}},
         "torch.load"),
        ({"_target_": "sedvae.posterior.PosteriorFlow",
          "_args_": [{"_target_": "numpy.savetxt", "fname": "{m}", "X": [1.0]}]},
         "numpy.savetxt"),
        # a sedvae prefix that reaches a torch function through a module attribute
        ({"_target_": "sedvae.checkpoint.torch.load", "f": "{m}"}, "sedvae.checkpoint.torch.load"),
        # a sedvae function that writes files
        ({"_target_": "sedvae.fileio.write_text_atomic", "path": "{m}", "text": "x"},
         "write_text_atomic"),
        # a non-network sedvae class
        ({"_target_": "sedvae.checkpoint.ExportCheckpoint", "kind": "posterior", "out": "{m}",
          "run_config": "{m}"}, "ExportCheckpoint"),
        # keys hydra would act on, and resolvers
        ({**FLOW, "_callable_": "os.system"}, "_callable_"),
        ({**FLOW, "hidden": "${oc.env:HOME}"}, "interpolation"),
        ({**FLOW, "hidden": [{"_target_": "builtins.exec", "_args_": ["1"]}]}, "builtins.exec"),
    ],
)
def test_nested_and_disguised_targets_are_refused(tmp_path, config, named):
    marker = str(tmp_path / "pwned")

    def fill(node):
        if isinstance(node, dict):
            return {k: fill(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fill(v) for v in node]
        return node.replace("{m}", marker) if isinstance(node, str) else node

    path = crafted(tmp_path / "evil.pt", fill(config))
    with pytest.raises(CheckpointError, match=rf"evil\.pt.*{named}"):
        load_checkpoint(path)
    assert files(tmp_path) == {"evil.pt"}


def test_a_pickled_object_in_the_file_is_refused_and_runs_nothing(tmp_path):
    torch.save({"format": FORMAT, "config": WritesAFile(tmp_path / "pwned")}, tmp_path / "p.pt")
    with pytest.raises(CheckpointError, match=r"p\.pt.*not a readable checkpoint"):
        load_checkpoint(tmp_path / "p.pt")
    # the same payload in a Lightning checkpoint given to the export command
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}, "hyper_parameters": WritesAFile(tmp_path / "pwned")},
               run / "checkpoints" / "last.ckpt")  # fmt: skip
    with pytest.raises(CheckpointError, match=r"last\.ckpt.*not a readable checkpoint"):
        export(run, tmp_path / "out.pt")
    assert files(tmp_path) == {"p.pt", "run", "checkpoints", "last.ckpt"}


def test_allowed_configs_pass_unchanged():
    assert check_config(FLOW) == FLOW
    sps = {"_target_": "sedvae.emulator.load_emulator", "path": "x.ckpt"}
    assert check_config(sps) == sps
    act = {"_target_": "torch.nn.SiLU"}
    assert check_config(act) == act


# ---- the format ------------------------------------------------------------------------------
def test_round_trip_keeps_weights_and_metadata(tmp_path):
    net = small_flow()
    path = save_checkpoint(tmp_path / "f.pt", "posterior", net, FLOW, {"epochs": 3})
    loaded, meta = load_checkpoint(path, "posterior")
    assert not loaded.training and loaded.meta is meta
    assert meta["training"] == {"epochs": 3}
    assert meta["fingerprint"] == physics_fingerprint()
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    raw = read_torch_file(path)
    assert (raw["format"], raw["format_version"], raw["kind"]) == (FORMAT, 2, "posterior")
    assert raw["config"] == FLOW
    assert sorted(tmp_path.iterdir()) == [path]  # the atomic write left no temporary file


def test_the_fingerprint_holds_inputs_not_computed_floats():
    fp = physics_fingerprint()
    assert set(fp) == {"physics_version", "param_names", "param_ranges", "files"}
    assert fp["param_names"][0] == "logmstar" and len(fp["param_ranges"]) == 12
    assert fp["param_ranges"][6] == ["tburst", 0.01, 13.27, "log"]
    nmf = "NMF_2basis_SFH_components_nowgt_lin_Nc4.txt"
    assert len(fp["files"][nmf]) == 16 and fp["files"]["bc03_miles_stellar_grids.fits"]


def test_corrupt_file_names_the_file(tmp_path):
    path = save_checkpoint(tmp_path / "good.pt", "posterior", small_flow(), FLOW)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt is not a readable checkpoint"):
        load_checkpoint(tmp_path / "cut.pt", "autoencoder")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"text\.pt"):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_file_of_another_kind_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "post.pt", "posterior", small_flow(), FLOW)
    with pytest.raises(CheckpointError, match=r"post\.pt.*kind 'posterior', expected kind "
                                              "'autoencoder'"):  # fmt: skip
        load_checkpoint(path, "autoencoder")


def test_another_physics_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "f.pt", "posterior", small_flow(), FLOW)
    payload = torch.load(path, weights_only=True)
    payload["meta"]["fingerprint"]["files"]["sfh_t_int.txt"] = "0" * 16
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt.*sfh_t_int\.txt"):
        load_checkpoint(tmp_path / "other.pt")
    payload["meta"].pop("fingerprint")
    torch.save(payload, tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match=r"none\.pt: no physics fingerprint"):
        load_checkpoint(tmp_path / "none.pt")


def test_upgrade_keeps_format_1_weights_bit_identical(tmp_path):
    net = small_flow(3)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save({"kind": "sedvae-posterior", "format_version": 1, "sedvae_version": "0.1.0",
                "config": FLOW, "state_dict": state, "meta": {"epochs": 30}},
               tmp_path / "old.pt")  # fmt: skip
    with pytest.raises(CheckpointError, match=r"old\.pt is a format-1 .*upgrade"):
        load_checkpoint(tmp_path / "old.pt")
    main(["upgrade", str(tmp_path / "old.pt"), str(tmp_path / "new.pt")])
    loaded, meta = load_checkpoint(tmp_path / "new.pt", "posterior")
    assert meta["training"]["epochs"] == 30
    new = read_torch_file(tmp_path / "new.pt")["state_dict"]
    assert new.keys() == state.keys() and all(torch.equal(new[k], state[k]) for k in state)
    assert upgrade(tmp_path / "old.pt", tmp_path / "again.pt").is_file()


def test_export_takes_the_best_checkpoint_of_a_run(tmp_path, capsys):
    """A run directory exports the checkpoint ModelCheckpoint recorded as best, read with
    weights_only; the kind comes from model._target_, the config from model.net."""
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save({"model": {"_target_": "sedvae.posterior.lightning.PosteriorModule",
                              "net": FLOW}}, run / "config.yaml")  # fmt: skip
    best, last = small_flow(1), small_flow(2)
    torch.save({"state_dict": {f"net.{k}": v for k, v in best.state_dict().items()},
                "epoch": 4, "global_step": 50}, run / "checkpoints" / "epoch004.ckpt")  # fmt: skip
    callbacks = {"ModelCheckpoint{'monitor': 'val/loss'}": {
        "best_model_path": "/elsewhere/checkpoints/epoch004.ckpt"}}
    torch.save({"state_dict": {f"net.{k}": v for k, v in last.state_dict().items()},
                "epoch": 9, "global_step": 100, "callbacks": callbacks},
               run / "checkpoints" / "last.ckpt")  # fmt: skip
    main(["export", str(run), str(tmp_path / "exported.pt")])
    assert "posterior" in capsys.readouterr().out
    net, meta = load_checkpoint(tmp_path / "exported.pt", "posterior")
    assert meta["training"]["lightning_checkpoint"] == "epoch004.ckpt"
    assert meta["training"]["epochs"] == 5
    for key, value in best.state_dict().items():
        assert torch.equal(net.state_dict()[key], value)
