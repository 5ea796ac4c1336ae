"""TrainConfig: method options as nested sections, the flat keys of earlier releases, frozen
data that round-trips; training from frames in memory; IVON's sampled step on an exception."""

import dataclasses
import warnings

import pytest
import torch
from ase.io import read

from ase_race.errors import ConfigError
from ase_race.training import TrainConfig, fit, train
from ase_race.training.methods import registered_methods
from ase_race.training.methods.swag import SWAGOptions

TINY = {"num_features": 4, "hidden_irreps": "4x0e+4x1o", "sh_lmax": 1, "radial_mlp": [8], "readout_hidden": 4, "dtype": "float64"}


def test_sections_are_typed_and_round_trip():
    config = TrainConfig(method="swag", swag={"rank": 5, "start_epoch": 3}, model={"num_layers": 3})
    assert isinstance(config.swag, SWAGOptions) and config.swag.rank == 5 and config.method_options is config.swag
    assert config.ensemble.members == 10  # every method has its section, with defaults
    data = config.to_dict()
    assert data["swag"] == dataclasses.asdict(config.swag) and "options" not in data
    assert TrainConfig.from_dict(data) == config
    # a section given as a dict in replace() changes only the keys it names
    changed = config.replace(swag={"rank": 7})
    assert (changed.swag.rank, changed.swag.start_epoch) == (7, 3)


def test_config_is_frozen_including_the_model_overrides():
    config = TrainConfig(model={"num_layers": 3})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    with pytest.raises(TypeError):
        config.model["num_layers"] = 4
    for method in registered_methods().values():  # the renames are shared by every config
        if method.Options is not None:
            with pytest.raises(TypeError):
                method.Options.renamed["lr"] = "step_size"


def test_flat_keys_of_earlier_releases_are_read_with_a_deprecation_message():
    with pytest.warns(FutureWarning, match="'swag_rank' is deprecated; write 'swag.rank'"):
        config = TrainConfig(method="swag", swag_rank=6, test_samples=8, members=3)
    assert (config.swag.rank, config.swag.test_samples, config.ensemble.members) == (6, 8, 3)
    # the shared flat key test_samples belongs to the method that runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert TrainConfig(method="ivon", test_samples=5).ivon.test_samples == 5
        assert TrainConfig(method="ivon", test_samples=5).swag.test_samples == 0


def test_yaml_sections_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: laplace\nlaplace:\n  subset: last_layer\nmodel:\n  num_layers: 3\n")
    config = TrainConfig.from_yaml(str(path), ["laplace.prior_precision=2.5", "model.num_features=8", "lr=0.1"])
    assert (config.laplace.subset, config.laplace.prior_precision) == ("last_layer", 2.5)
    assert dict(config.model) == {"num_layers": 3, "num_features": 8} and config.lr == 0.1


@pytest.mark.parametrize("bad, message", [
    ({"swag": {"rnk": 3}}, "unknown SWAGOptions keys \\['rnk'\\]"),
    ({"laplace": {"subset": "first_layer"}}, "laplace.subset='first_layer' is not one of"),
    ({"method": "mcdropout"}, "method='mcdropout' is not one of"),
    ({"swag_rnk": 3}, "unknown training config keys \\['swag_rnk'\\]"),
    ({"plateau_factor": 1.5}, "plateau_factor must be in \\(0, 1\\]"),
])
def test_bad_settings_are_refused_by_name(bad, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**bad)


def test_the_cli_refuses_an_unknown_method_with_the_registered_ones(capsys):
    from ase_race.cli.main import main

    assert main(["train", "train_file=x.extxyz", "--method", "mcdropout"]) != 0
    message = capsys.readouterr().err
    assert "method='mcdropout' is not one of" in message and all(kind in message for kind in registered_methods())


def _config(emt_file, out, **kw):
    return TrainConfig(**{**dict(
        train_file=str(emt_file), e0s="fit", valid_fraction=4, preset="tiny", model=TINY, loss="nll_jef",
        warmup_epochs=1, batch_size=3, max_epochs=2, lr=0.01, output_dir=str(out), seed=3,
    ), **kw})


def test_fit_from_frames_in_memory_equals_training_from_the_file(emt_file, tmp_path):
    """The same structures, once as ase.Atoms in memory and once as a file, give the same model;
    in memory with in_memory=True nothing is written."""
    from ase_race import load_model

    from_file = load_model(train(_config(emt_file, tmp_path / "file"))).posterior
    atoms = read(emt_file, ":")
    out = tmp_path / "memory"
    bundle = fit(_config("", out), train=atoms, in_memory=True)
    assert not out.exists()
    for a, b in zip(from_file.model.parameters(), bundle.posterior.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert bundle.metadata["training"]["n_train"] == 8


def test_frames_without_labels_are_named(tmp_path):
    from ase.build import molecule

    from ase_race.errors import DataError

    with pytest.raises(DataError, match="training structure 0 has no energy under key 'REF_energy'"):
        fit(TrainConfig(e0s="fit", output_dir=str(tmp_path)), train=[molecule("H2O")], in_memory=True)


def test_ivon_restores_the_mean_weights_when_a_sampled_step_fails(emt_file, tmp_path, monkeypatch):
    from ase_race.training.api import prepare
    from ase_race.training.batches import GraphDataset
    from ase_race.training.loop import Trainer
    from ase_race.training.methods import method_class

    config = _config(emt_file, tmp_path / "ivon", method="ivon")
    model_config, train_frames, valid_frames = prepare(config)
    sets = [GraphDataset(f, model_config.species, model_config.r_max, torch.float64) for f in (train_frames, valid_frames)]
    trainer = Trainer(config, model_config, *sets, hooks=method_class("ivon").hooks(config), in_memory=True)
    before = [p.detach().clone() for p in trainer.model.parameters()]

    def failing_loss(*args, **kwargs):
        raise torch.linalg.LinAlgError("the force covariance is not positive definite")

    monkeypatch.setattr(trainer, "loss", failing_loss)
    with pytest.raises(torch.linalg.LinAlgError):
        trainer.run(max_steps=1)
    for a, b in zip(trainer.model.parameters(), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_section_option_wins_over_the_flat_key_of_an_old_config(tmp_path):
    """An old YAML file with flat keys plus a new override or CLI flag: the override counts."""
    path = tmp_path / "old.yaml"
    path.write_text("method: laplace\nlaplace_subset: all\nmembers: 3\nswag_rank: 40\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        config = TrainConfig.from_yaml(str(path), ["laplace.subset=last_layer", "ensemble.members=5", "swag.rank=8"])
        assert (config.laplace.subset, config.ensemble.members, config.swag.rank) == ("last_layer", 5, 8)
        # and replace() with a flat key still changes the option
        assert config.replace(swag_rank=12).swag.rank == 12


def test_cli_flags_reach_the_method_sections(tmp_path):
    import argparse

    from ase_race.cli import train as cli_train

    path = tmp_path / "old.yaml"
    path.write_text("train_file: x.extxyz\nlaplace_subset: all\n")
    seen = {}
    parser = argparse.ArgumentParser()
    cli_train.add_parser(parser.add_subparsers())
    args = parser.parse_args(["train", str(path), "--method", "laplace", "--laplace-subset", "last_layer",
                              "--test-samples", "4"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import ase_race.training

        original = ase_race.training.train
        ase_race.training.train = lambda config: seen.setdefault("config", config) and tmp_path
        try:
            cli_train.run(args)
        finally:
            ase_race.training.train = original
    config = seen["config"]
    assert (config.method, config.laplace.subset, config.laplace.test_samples) == ("laplace", "last_layer", 4)
    args = parser.parse_args(["train", str(path), "--method", "mve", "--test-samples", "4"])
    with pytest.raises(ConfigError, match="--test-samples: method 'mve' has no option 'test_samples'"):
        cli_train.run(args)


def test_config_pickles_and_copies():
    import copy
    import pickle

    config = TrainConfig(method="swag", swag={"rank": 5}, model={"num_layers": 3})
    assert pickle.loads(pickle.dumps(config)) == config == copy.deepcopy(config)
    assert dataclasses.asdict(config)["options"]["swag"]["rank"] == 5


def _datasets(config):
    from ase_race.training.api import prepare
    from ase_race.training.batches import GraphDataset

    model_config, train_frames, valid_frames = prepare(config)
    sets = [GraphDataset(f, model_config.species, model_config.r_max, torch.float64) for f in (train_frames, valid_frames)]
    return model_config, sets


def test_a_trainer_without_hooks_takes_those_of_its_method(emt_file, tmp_path):
    import ivon

    from ase_race.training.loop import Trainer

    config = _config(emt_file, tmp_path / "run", method="ivon")
    model_config, sets = _datasets(config)
    assert isinstance(Trainer(config, model_config, *sets, in_memory=True).optimizer, ivon.IVON)


def test_ivon_forgets_earlier_samples_of_a_step_that_fails(emt_file, tmp_path, monkeypatch):
    from ase_race.training.loop import Trainer

    config = _config(emt_file, tmp_path / "run", method="ivon", ivon={"train_samples": 2})
    model_config, sets = _datasets(config)
    trainer = Trainer(config, model_config, *sets, in_memory=True)
    loss, calls = trainer.loss, []

    def second_sample_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.linalg.LinAlgError("not positive definite")
        return loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "loss", second_sample_fails)
    with pytest.raises(torch.linalg.LinAlgError):
        trainer.run(max_steps=1)
    assert trainer.optimizer.state["count"] == 0 and trainer.optimizer.state["avg_grad"] is None


@pytest.mark.parametrize("method", ["ivon", "swag"])
def test_a_checkpoint_of_the_earlier_layout_resumes_exactly(method, emt_file, tmp_path):
    """Checkpoints written before method sections existed (flat config keys, the method's state
    under ivon_step / ivon_rng / swag, no data fingerprint) resume to the same weights."""
    from ase_race.training.loop import CHECKPOINT_NAME, Trainer

    extra = {"method": method, "swag": {"start_epoch": 0, "rank": 2}, "max_epochs": 3}
    whole_config = _config(emt_file, tmp_path / "whole", **extra)
    model_config, sets = _datasets(whole_config)
    whole = Trainer(whole_config, model_config, *sets)
    whole.run()
    split_config = _config(emt_file, tmp_path / "split", **extra)
    first = Trainer(split_config, model_config, *sets)
    first.run(max_steps=5)
    first.save_checkpoint()
    path = tmp_path / "split" / CHECKPOINT_NAME
    data = torch.load(path, weights_only=True)
    flat = {k: v for k, v in data["train_config"].items() if k not in registered_methods()}
    flat.update({f"swag_{k}": v for k, v in data["train_config"]["swag"].items() if k != "test_samples"})
    flat.update({f"ivon_{k}": v for k, v in data["train_config"]["ivon"].items()
                 if k not in ("test_samples", "warm_start")})  # options newer than the flat layout
    flat.update(members=10, test_samples=0, laplace_subset="all", laplace_prior_precision=0.0,
                laplace_noise="residual", base_model="")
    state = data.pop("method_state")
    data.pop("data_fingerprint")
    data["train_config"] = flat
    data["ivon_step"], data["ivon_rng"] = state.get("step", 0), state.get("rng", torch.Generator().get_state())
    data["swag"] = state if method == "swag" else None
    torch.save(data, path)
    second = Trainer(split_config, model_config, *sets)
    assert second.state.global_step == 5
    second.run()
    for a, b in zip(second.model.parameters(), whole.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_checkpoint_of_other_structures_is_refused(emt_file, tmp_path):
    from ase_race.training.loop import Trainer

    config = _config("", tmp_path / "run", model={**TINY, "scale": 1.0, "shift": 0.0, "avg_num_neighbors": 3.0,
                                                   "e0s": [0.0, 0.0, 0.0], "species": [1, 6, 8]})
    atoms = read(emt_file, ":")
    fit(config, train=atoms)
    atoms[0].positions[0, 0] += 0.1
    with pytest.raises(ConfigError, match="the training or validation structures"):
        fit(config, train=atoms)
