"""A search's settings are declared once, as ``SearchSettings`` fields: the flags, their validation, the resume rule and
``experiment.json`` all come from those fields, so a new setting is one new field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from ips_search.errors import ConfigError
from ips_search.experiment.settings import (
    SAMPLERS,
    SearchSettings,
    at_least,
    check_applies,
    check_resume,
    check_settings,
    flags_of,
    new_settings,
    setting,
    settings_from_saved,
    trial_fixed,
    trials_at_once,
)
from ips_search.search import cli

IDENTITY = {"name": "x", "results_dir": "r", "space": "smoke"}


@dataclass
class Wider(SearchSettings):
    """``SearchSettings`` with two settings more, declared as a new setting is: one field each, nothing else."""

    patience: int = setting(
        3, "ASHA: rungs a trial may lose before it stops", rules=(at_least(1),), only_with=("scheduler", "asha")
    )
    pruner: str = setting("none", "Optuna pruner", choices=("none", "median"))


def parse(*argv: str, schema: type = SearchSettings) -> dict:
    return cli.given_settings(cli.build_parser(schema).parse_args(list(argv)), schema)


def help_of(schema: type = SearchSettings) -> str:
    return " ".join(cli.build_parser(schema).format_help().split())


def test_a_new_setting_is_one_field():
    # the flag, with its help and default
    assert "--patience PATIENCE ASHA: rungs a trial may lose before it stops (default: 3)" in help_of(Wider)
    assert "--pruner {none,median} Optuna pruner (default: none)" in help_of(Wider)
    assert parse("--scheduler", "asha", "--patience", "5", schema=Wider) == {"scheduler": "asha", "patience": 5}
    # its choices, on the command line and in a saved experiment
    with pytest.raises(SystemExit):
        cli.build_parser(Wider).parse_args(["--pruner", "hyperband"])
    with pytest.raises(ConfigError, match="^setting pruner must be one of none, median, got 'hyperband'$"):
        settings_from_saved({**IDENTITY, "pruner": "hyperband"}, Wider)
    # its range rule, and the setting it only applies with
    with pytest.raises(ConfigError, match="^--patience must be at least 1, got 0$"):
        check_settings(parse("--patience", "0", schema=Wider), Wider)
    with pytest.raises(ConfigError, match="^--patience only applies to --scheduler asha, and this search uses fifo"):
        check_applies(parse("--patience", "2", schema=Wider), Wider)
    # a new search's value, and experiment.json
    settings = new_settings(parse("--pruner", "median", schema=Wider), Wider, **IDENTITY, epochs=4)
    assert (settings.patience, settings.pruner, settings.to_dict()["pruner"]) == (3, "median", "median")
    assert settings_from_saved(settings.to_dict(), Wider) == settings
    with pytest.raises(ConfigError, match="^setting patience must be int, got '3'$"):
        settings_from_saved({**settings.to_dict(), "patience": "3"}, Wider)
    # the resume rule: kept as saved
    check_resume(parse("--patience", "3", schema=Wider), settings)
    with pytest.raises(ConfigError, match="^--patience 4 differs from experiment 'x', which runs with 3"):
        check_resume(parse("--patience", "4", schema=Wider), settings)


def test_every_saved_setting_is_a_flag_and_every_flag_is_in_the_help():
    fields = {f.name for f in dataclasses.fields(SearchSettings)} - set(IDENTITY)
    assert {f.name for f in flags_of()} == fields
    flags = {a for action in cli.build_parser()._actions for a in action.option_strings}
    assert flags == {
        "--folds",
        "--metric",
        "--no-reference",
        "--prune-margin",
        "--prune-interval",
        *("-h", "--help", "--trials", "--space", "--name", "--results-dir", "--objective", "--max-memory-mb"),
        *("--sampler", "--scheduler", "--grace-period", "--reduction-factor", "--rung-metric", "--brackets"),
        *("--cpus-per-trial", "--gpus-per-trial", "--concurrency", "--address", "--num-gpus", "--no-dashboard"),
        *("--dashboard-host", "--resume", "--confirm", "--confirm-top", "--seed", "--epochs", "--verbose"),
        "--dry-run",
    }
    text = help_of()
    for flag in flags_of():
        assert " ".join(flag.setting.help.replace("%(default)s", str(flag.default)).split()) in text, flag.flag


def test_the_help_shows_each_default_once():
    text = help_of()
    assert "Optuna sampler (default: tpe)" in text
    assert "number of trials (configs) to run (default 50);" in text
    assert "trial scheduler: fifo runs every trial to its last epoch (the default);" in text
    assert "(default 1, Ray's ASHAScheduler default) --reduction-factor" in text  # no "(default: 1)" added
    assert "how many of the best configs --confirm retrains (default: 3)" in text
    assert "(default: results)" in text and "(default: 127.0.0.1)" in text  # run options too


def test_the_command_line_is_parsed_once_and_names_what_it_gives():
    assert parse() == {} and parse("--dry-run", "--space", "smoke") == {}
    assert parse("--sampler", "tpe") == {"sampler": "tpe"}  # the default's value, given: still given
    args = cli.build_parser().parse_args(["--trials", "7"])
    assert args.trials == 7 and not hasattr(args, "sampler") and args.space == "default"


def test_a_new_search_takes_each_flag_or_its_default_and_the_spaces_epochs():
    settings = new_settings({"seed": 5}, **IDENTITY, epochs=6)
    assert (settings.trials, settings.sampler, settings.scheduler, settings.seed, settings.epochs) == (
        50,
        "tpe",
        "fifo",
        5,
        6,
    )
    assert settings.gpus_per_trial is None and settings.concurrency is None  # auto: the cluster decides
    assert new_settings({"epochs": 2}, **IDENTITY, epochs=6).epochs == 2  # --epochs overrides the space's
    assert set(SAMPLERS) == set(next(f for f in flags_of() if f.name == "sampler").setting.choices)


def test_a_resume_extends_trials_and_never_lowers_them():
    settings = SearchSettings(**IDENTITY, trials=20)
    with pytest.raises(ConfigError, match=r"^--trials 10 is below the 20 trials experiment 'x' already has; pass "):
        check_resume({"trials": 10}, settings)
    check_resume({"trials": 30}, settings)
    assert settings.trials == 30


def test_trials_get_epochs_and_seed_from_the_settings_in_one_place():
    fixed = {"data": {"dataset": "megapixel"}, "train": {"epochs": 9, "seed": 1, "lr": 0.1}}
    settings = SearchSettings(**IDENTITY, epochs=3, seed=7)
    assert trial_fixed(fixed, settings) == {
        "data": {"dataset": "megapixel"},
        "train": {"epochs": 3, "seed": 7, "lr": 0.1},
        "evaluation": {"metric": "accuracy", "folds": 1},
    }
    assert trial_fixed({}, settings, seed=8)["train"] == {"epochs": 3, "seed": 8}  # a confirm run's own seed
    assert fixed["train"] == {"epochs": 9, "seed": 1, "lr": 0.1}  # the space's sections are left as they were


@pytest.mark.parametrize(
    ("cpus_per_trial", "gpus_per_trial", "cpus", "gpus", "expected"),
    [
        (1.0, 0.0, 4, None, 4),
        (1.0, 0.0, 64, None, 10),  # never more than the trials
        (2.0, 1.0, 8, None, 4),  # GPUs not known yet: the CPUs alone
        (2.0, 1.0, 8, 2.0, 2),
        (1.0, 0.25, 8, 1.0, 4),
        (3.0, 0.0, 2, None, 0),  # not one trial fits
    ],
)
def test_trials_at_once(cpus_per_trial, gpus_per_trial, cpus, gpus, expected):
    settings = SearchSettings(**IDENTITY, trials=10, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial)
    assert trials_at_once(settings, cpus, gpus) == expected
