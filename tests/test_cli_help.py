"""What `--help` shows, and how `train` reads its words: defaults shown once, no pointer to docs
an installed package lacks, key=value overrides between flags."""

import argparse

import numpy as np
import pytest

from ase_race.cli.main import build_parser, main, parse


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_shows_every_default_once_and_points_to_no_docs_file():
    for name, sub in subparsers().items():
        text = sub.format_help()
        assert "docs/" not in text, name
        assert "default: default" not in text
        for action in sub._actions:
            if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
                continue
            assert action.help, f"{name} {action.option_strings} has a default but no help"
            shown = action.help if "default" in action.help else sub._get_formatter()._get_help_string(action)
            assert "default" in shown, (name, action.option_strings)
    evaluate = " ".join(subparsers()["evaluate"].format_help().split())
    assert "(default: REF_energy)" in evaluate
    md = " ".join(subparsers()["md"].format_help().split())
    assert "MD steps (default: 2000)" in md
    assert "(default: no limit) (default" not in md  # a help that states its default gets no second one
    assert "K (500 K is the rMD17 sampling temperature) (default: 500.0)" in md


def test_train_takes_flags_and_overrides_in_any_order(tmp_path, monkeypatch):
    import ase_race.training as training

    seen = {}

    def fake_train(config):
        seen["config"] = config
        return tmp_path / "model.pt"

    monkeypatch.setattr(training, "train", fake_train)
    config = tmp_path / "c.yaml"
    config.write_text("train_file: t.extxyz\nmax_epochs: 7\n")
    for argv in (["train", str(config), "max_epochs=3", "--method", "ensemble", "lr=0.02", "--members", "3"],
                 ["train", "max_epochs=3", "--method", "ensemble", str(config), "lr=0.02", "--members", "3"],
                 ["train", "--members", "3", "lr=0.02", "--method", "ensemble", "max_epochs=3", str(config)]):
        assert main(argv) == 0
        c = seen.pop("config")
        assert (c.method, c.max_epochs, c.lr, c.options["ensemble"].members) == ("ensemble", 3, 0.02, 3), argv
        assert c.train_file == "t.extxyz"
    assert main(["train", str(config), str(config)]) == 2  # two config files: a clear error
    with pytest.raises(SystemExit):
        parse(["train", str(config), "--no-such-flag"])
    with pytest.raises(SystemExit):
        parse(["predict", "model.pt", "x.extxyz", "stray=word"])  # only train takes free overrides


def test_figures_label_ticks_without_offsets():
    from matplotlib.figure import Figure

    from ase_race.evaluation.plotting import plain_ticks

    fig = Figure()
    linear, logarithmic = fig.subplots(1, 2)
    linear.plot([0, 1], [-4210.31, -4210.29])
    logarithmic.loglog([1, 10], [1, 100])
    plain_ticks(linear, logarithmic)
    fig.canvas.draw()
    assert linear.yaxis.get_major_formatter().get_useOffset() is False
    assert linear.yaxis.get_offset_text().get_text() == ""
    assert all("4210" in t.get_text() or t.get_text() == "" for t in linear.get_yticklabels())


def test_md_plot_ticks_have_no_offset(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from ase_race.cli import md

    captured = []
    original = Figure.savefig

    def keep(self, *args, **kwargs):
        captured.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    rows = [{"time_fs": t, "energy_std": 0.01, "max_forces_std": 0.1 + 1e-6 * t, "temperature_K": 300 + 1e-4 * t}
            for t in np.arange(5.0)]
    md.plot_uncertainty(rows, tmp_path / "u.png")
    assert all(ax.yaxis.get_major_formatter().get_useOffset() is False for ax in captured[0].axes)
