"""Config and launcher checks, in process and before any worker: flags, YAML, strict types,
and every cross-field check, each a single line naming the field, the value and the fix."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from pipetransformer.cli import build_parser, main
from pipetransformer.config import Config, ConfigError, RunFacts, apply_overrides, load_config

from conftest import make_csv


def test_help_names_every_flag():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ["--model", "--data", "--epochs", "--batch-size", "--lr", "--alpha", "--freeze",
                 "--train-samples", "--eval-samples", "--max-length", "--seed", "--run-dir",
                 "--nproc", "--stages", "--elastic", "--schedule", "--batch-policy", "--config"]:
        assert flag in text


@pytest.mark.parametrize("args, words", [
    (["--alpha", "1.5"], ["--alpha=1.5", "between 0 and 1"]),
    (["--epochs", "0"], ["--epochs=0", "at least 1"]),
    (["--max-length", "4"], ["--max-length=4", "between 8"]),
    (["--train-samples", "-3"], ["--train-samples=-3"]),
])
def test_bad_values_name_field_value_and_fix(args, words, capsys, tmp_path):
    assert main(["train", *args, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err
    assert not (tmp_path / "r").exists()


def test_yaml_config_and_flag_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 7, lr: 2e-5}\nfreeze: {alpha: 0.25}\nrun_dir: x\n")
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.train.lr, cfg.freeze.alpha, cfg.run_dir) == (7, 2e-5, 0.25, "x")
    path.write_text("train: {epoks: 7}\n")
    with pytest.raises(ConfigError, match="epoks"):
        load_config(path)
    path.write_text("train: {epochs: many}\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    assert Config.from_dict(Config().to_dict()) == Config()


def test_bare_off_and_on_in_yaml_are_the_choices_not_booleans(tmp_path):
    path = tmp_path / "c.yaml"  # YAML 1.1 reads these as false / true
    path.write_text("freeze: {freeze: off}\ncache: {cache: on}\ndata: {augment: off}\ntrain: {dropout: off}\n")
    cfg = load_config(path)
    assert (cfg.freeze.freeze, cfg.cache.cache, cfg.data.augment, cfg.train.dropout) == ("off", "on", "off", False)


def test_csv_without_label_column_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,sentiment\ngood,1\n")
    assert main(["train", "--data", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    assert "label" in capsys.readouterr().err


def test_help_shows_each_default_once():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "(default: 4)" in text and "(default: None)" not in text


def test_one_parser_lists_every_command():
    from pipetransformer.commands import COMMANDS
    text = build_parser().format_help()
    assert all(name in text for name in ("train", "export", *COMMANDS)), text


def test_flags_are_never_abbreviated(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["train", "--epoch", "3"])
    assert e.value.code == 2 and "--epoch" in capsys.readouterr().err


@pytest.mark.parametrize("yaml_text, field", [
    ("train: {epochs: 1.7}", "--epochs=1.7"),
    ("train: {epochs: true}", "--epochs=True"),
    ("train: {dropout: 2}", "--dropout=2"),
    ("train: {lr: fast}", "--lr='fast'"),
])
def test_yaml_numbers_are_checked_as_strictly_as_flags(tmp_path, yaml_text, field):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(ConfigError, match="expected a value of type") as e:
        load_config(path)
    assert field in str(e.value)


def test_a_run_dir_in_a_yaml_comment_is_not_a_run_dir(tmp_path, monkeypatch, capsys):
    from pipetransformer.cli import _config_from_args
    path = tmp_path / "c.yaml"
    path.write_text("# run_dir: somewhere\ntrain: {epochs: 2}\n")
    args = build_parser().parse_args(["train", "--config", str(path)])
    assert _config_from_args(args).run_dir.startswith("runs/run-")


FACTS = RunFacts("text", "text", num_units=14, train_rows=1000, max_positions=512)


def _validate(world=4, facts=FACTS, **sections):
    cfg = Config.from_dict(sections)
    cfg.validate(world, facts)


@pytest.mark.parametrize("world, sections, words", [
    (4, {"parallel": {"stages": 3}}, ["--stages=3", "must divide", "[4, 2, 1]"]),
    (4, {"train": {"batch_size": 30}}, ["--batch-size=30", "up to 4", "multiple of 4"]),
    (4, {"train": {"batch_size": 31}, "parallel": {"stages": 2, "batch_policy": "per-replica"}},
     ["--batch-size=31", "multiple of 2"]),
    (2, {"train": {"batch_size": 32}, "parallel": {"micro_batches": 3, "stages": 2}},
     ["--micro-batches=3", "(32 with 2"]),
    (2, {"train": {"batch_size": 32}, "parallel": {"micro_batches": 3}}, ["--micro-batches=3", "(16 with 1"]),
    (4, {"train": {"batch_size": 2}, "parallel": {"batch_policy": "per-replica", "stages": 4}},
     ["--batch-size=2", "4 stages need at least 4 micro-batches"]),
    (16, {"train": {"batch_size": 32}, "parallel": {"stages": 16}},
     ["--stages=16", "14 units", "use one of [1, 2, 4, 8] or auto"]),
    (1, {"train": {"batch_size": 2048}}, ["--batch-size=2048", "larger than the training set (1000"]),
    (1, {"model": {"max_length": 1024}}, ["--max-length=1024", "512 positions"]),
    (1, {"data": {"augment": "crop-flip"}}, ["--augment='crop-flip'", "image models"]),
    (2, {"freeze": {"freeze_every": 4}, "parallel": {"batch_policy": "per-replica"}},
     ["--freeze-every=4", "per-replica", "use --freeze-every 0 or --batch-policy constant"]),
])
def test_cross_field_checks_name_the_field_value_and_fix(world, sections, words):
    with pytest.raises(ConfigError) as e:
        _validate(world, **sections)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_stages_auto_may_start_from_every_layout_that_has_units_and_batch_enough():
    assert Config().start_stage_choices(16, FACTS) == [1, 2, 4, 8]  # 14 units: no 16-stage pipeline
    per_replica = Config.from_dict({"train": {"batch_size": 4}, "parallel": {"batch_policy": "per-replica"}})
    assert per_replica.start_stage_choices(4, FACTS) == [1, 2, 4]  # 4 stages: 4 rows, one a micro-batch
    two = Config.from_dict({"train": {"batch_size": 2}, "parallel": {"batch_policy": "per-replica"}})
    with pytest.raises(ConfigError, match="--batch-size=2 is invalid: .* multiple of 4"):  # no layout can start
        two.start_stage_choices(4, FACTS)
    assert Config.from_dict({"parallel": {"stages": 2}}).start_stage_choices(4, FACTS) == [2]
    paper = Config.from_dict({"parallel": {"stages": "all"}})  # the paper's start: one pipeline over all
    assert paper.parallel.stages == -1 and paper.start_stage_choices(4, FACTS) == [4]
    with pytest.raises(ConfigError, match="--stages='all' is invalid: one pipeline of 16 stages .* 14 units"):
        paper.start_stage_choices(16, FACTS)


def test_auto_is_a_word_for_stages_and_micro_batches_in_yaml_flags_and_keywords():
    cfg = Config.from_dict({"parallel": {"stages": "auto", "micro_batches": "auto"}})
    assert (cfg.parallel.stages, cfg.parallel.micro_batches) == (0, 0)
    assert apply_overrides(Config(), {"stages": "auto", "micro_batches": 4}).parallel.micro_batches == 4
    with pytest.raises(ConfigError, match="--stages='many' is invalid: expected a value of type int or auto"):
        Config.from_dict({"parallel": {"stages": "many"}})


def test_data_of_the_wrong_kind_for_the_model():
    with pytest.raises(ConfigError, match="this is image data but --model='minilm-l6' is a text model"):
        _validate(1, RunFacts("text", "image", 14, 1000))


def test_valid_settings_pass():
    _validate(4)
    _validate(4, parallel={"stages": 2, "batch_policy": "per-replica"}, train={"batch_size": 16})
    _validate(1, facts=RunFacts("image", "image", 10, 64, None), train={"batch_size": 64})


def test_the_launcher_refuses_before_any_worker_within_a_second(tmp_path, capsys):
    csv = make_csv(tmp_path / "r.csv", rows=40)
    start = time.perf_counter()
    code = main(["train", "--data", str(csv), "--nproc", "2", "--batch-size", "33",
                 "--run-dir", str(tmp_path / "r")])
    seconds = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--batch-size=33" in err, err
    assert seconds < 1.0 and not (tmp_path / "r").exists()


def test_npz_without_labels_is_named_before_any_worker(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8)))
    assert main(["train", "--data", str(tmp_path / "bad.npz"), "--run-dir", str(tmp_path / "r")]) == 2
    assert "arrays named x" in capsys.readouterr().err


def test_the_command_line_and_the_planning_side_load_no_torch(tmp_path):
    """The launcher refuses bad input within a second: importing the command line, the pure
    planning modules and running a pre-start check leave torch unloaded."""
    import subprocess
    import sys
    code = ("import sys\n"
            "import pipetransformer.planner, pipetransformer.layouts, pipetransformer.autodp\n"
            "import pipetransformer.autofreeze, pipetransformer.autocache.policy\n"
            "from pipetransformer.cli import main\n"
            f"assert main(['train', '--epochs', '0', '--run-dir', {str(tmp_path / 'run')!r}]) == 2\n"
            f"assert main(['plan', '--epochs', '0']) == 2\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_resume_help_names_every_field_the_schema_marks_resumable():
    from pipetransformer.cli import RESUMABLE
    text = " ".join(build_parser()._subparsers._group_actions[0].choices["train"].format_help().split())
    assert {"nproc", "stages", "compile"} <= RESUMABLE and not RESUMABLE & {"lr", "epochs", "freeze", "seed"}
    assert all(name in text for name in RESUMABLE), text
    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    assert all(f"`--{name.replace('_', '-')}`" in readme for name in RESUMABLE)
