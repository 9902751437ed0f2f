"""Tests of the configuration (defaults < TOML < CLI, validation) and of the command line:
one-line errors with exit status 2, the run directory a finished run leaves, and resume.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_config_cli.py -q
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pipemlaan.config import Config, TrainConfig, load_config, validate_world
from pipemlaan.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- precedence --------------------------------------------------------------------------

def test_precedence_cli_over_toml_over_defaults(tmp_path):
    toml = write(tmp_path / "c.toml", """
[model]
name = "resnet32"
K = 8

[train]
epochs = 3
lr = 0.5

[method]
mlm = false
""")
    cfg = load_config(toml, ["--train.epochs=7", "method.window=1", "--train.epochs=9"])
    defaults = Config()
    assert cfg.train.epochs == 9                     # CLI over TOML (the last CLI value wins)
    assert cfg.train.lr == 0.5                       # TOML over default
    assert cfg.model.name == "resnet32" and cfg.model.K == 8
    assert cfg.method.mlm is False
    assert cfg.method.window == 1                    # CLI over default
    assert cfg.train.batch_size == TrainConfig().batch_size   # untouched default
    assert cfg.method.name == defaults.method.name
    assert cfg.data == defaults.data and cfg.pipeline == defaults.pipeline
    # without the file, the CLI value still overrides the default
    assert load_config(None, ["--train.lr=0.25"]).train.lr == 0.25
    assert load_config(None, []).to_dict() == defaults.to_dict()


def test_cli_values_are_typed(tmp_path):
    cfg = load_config(None, ["--pipeline.partition=[1, 3]", "--method.lam=false",
                             "--train.lr=1", "--data.synthetic_image=[1,16,16]"])
    assert cfg.pipeline.partition == [1, 3]
    assert cfg.method.lam is False
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.synthetic_image == [1, 16, 16]


# ---- validation errors name the key ------------------------------------------------------

@pytest.mark.parametrize("toml,key", [
    ("[foo]\nbar = 1\n", "foo"),
    ("[model]\ndepth = 20\n", "model.depth"),
    ("[train]\nepochs = \"two\"\n", "train.epochs"),
    ("[train]\nepochs = 2.5\n", "train.epochs"),
    ("[train]\nlr = true\n", "train.lr"),
    ("[method]\nmlm = \"yes please\"\n", "method.mlm"),
    ("[pipeline]\npartition = 3\n", "pipeline.partition"),
    ("[model]\nname = \"resnet9\"\n", "model.name"),
    ("[model]\nK = 0\n", "model.K"),
])
def test_toml_errors_name_the_key(tmp_path, toml, key):
    path = write(tmp_path / "bad.toml", toml)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert key in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override,key", [
    ("foo.bar=1", "foo"),
    ("model.depth=20", "model.depth"),
    ("train.epochs=abc", "train.epochs"),
    ("train.lr=fast", "train.lr"),
    ("method.lam=maybe", "method.lam"),
    ("model.name=resnet9", "model.name"),
    ("model.name=vgg16", "model.name"),
    ("method.name=sgd", "method.name"),
    ("data.name=mnist", "data.name"),
    ("pipeline.mode=sync", "pipeline.mode"),
    ("model.K=0", "model.K"),
    ("train.epochs", "train.epochs"),      # no value: the message shows the expected form
])
def test_cli_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"--{override}"])
    assert key in str(e.value)


def test_window_larger_than_K():
    with pytest.raises(ConfigError, match=r"method\.window"):
        load_config(None, ["model.K=4", "method.mlm=true", "method.window=5"])
    # without MLM, or for end-to-end BP, the window is not used and so not checked
    load_config(None, ["model.K=4", "method.mlm=false", "method.window=5"])
    load_config(None, ["model.K=4", "method.name=bp", "method.window=5"])
    load_config(None, ["model.K=4", "method.mlm=true", "method.window=4"])


def test_partition_must_sum_to_K():
    with pytest.raises(ConfigError, match=r"pipeline\.partition"):
        load_config(None, ["model.K=4", "pipeline.partition=[2, 1]"])
    with pytest.raises(ConfigError, match=r"pipeline\.partition"):
        load_config(None, ["model.K=4", "pipeline.partition=[2, 3]"])
    assert load_config(None, ["model.K=4", "pipeline.partition=[1, 3]"]).pipeline.partition \
        == [1, 3]


def test_replicas_checks_against_the_world():
    """pipeline.replicas=D: the world is D x S ranks, train.batch_size the global batch."""
    cfg = load_config(None, ["model.K=4", "pipeline.replicas=2", "train.batch_size=64"])
    validate_world(cfg, 4, 4)          # 2 replicas x 2 stages
    validate_world(cfg, 8, 4)          # 2 x 4
    with pytest.raises(ConfigError, match=r"pipeline\.replicas=2 does not divide the 3 ranks"):
        validate_world(cfg, 3, 4)
    with pytest.raises(ConfigError, match=r"10 ranks give 5 pipeline stages.*model\.K=4"):
        validate_world(cfg, 10, 4)
    odd = load_config(None, ["model.K=4", "pipeline.replicas=4", "train.batch_size=66"])
    with pytest.raises(ConfigError, match=r"train\.batch_size=66 .* pipeline\.replicas=4"):
        validate_world(odd, 4, 4)
    part = load_config(None, ["model.K=4", "pipeline.replicas=2", "pipeline.partition=[1,1,2]"])
    with pytest.raises(ConfigError, match=r"2 stages per replica"):
        validate_world(part, 4, 4)
    validate_world(load_config(None, ["model.K=4", "pipeline.replicas=2",
                                      "pipeline.partition=[1,3]"]), 4, 4)
    # end-to-end BP cannot be cut into stages, but it can be replicated (plain data parallel)
    bp = load_config(None, ["method.name=bp", "pipeline.replicas=2"])
    validate_world(bp, 2, 1)
    with pytest.raises(ConfigError, match=r"method\.name=bp"):
        validate_world(bp, 4, 1)
    with pytest.raises(ConfigError, match=r"pipeline\.replicas=0"):
        load_config(None, ["pipeline.replicas=0"])


@pytest.mark.parametrize("name,K", [("resnet8", 5), ("resnet20", 11), ("resnet32", 17)])
def test_K_beyond_blocks_plus_one_is_rejected_by_load_config(name, K):
    """K can be checked from model.name alone (blocks + 1 at most), so validation at start-up
    must reject it before any model is built."""
    load_config(None, [f"model.name={name}", f"model.K={K - 1}", "method.mlm=false"])
    with pytest.raises(ConfigError, match=r"model\.K"):
        load_config(None, [f"model.name={name}", f"model.K={K}", "method.mlm=false"])


# ---- the command line --------------------------------------------------------------------

def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipemlaan.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


TINY = ["--model.name=resnet8", "--model.K=4", "--data.name=synthetic",
        "--data.synthetic_size=128", "--data.synthetic_image=[1, 16, 16]",
        "--train.batch_size=32", "--run.progress=false", "--train.device=cpu",
        "--run.log_every=1"]


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("pipemlaan: error:"), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


ERROR_CASES = {
    # case: (extra arguments, words the error line must contain)
    # (the other keys' errors are load_config's, checked above without a process)
    "unknown_key": (["--train.epoch=2"], ["train.epoch"]),
    "missing_config": (["--config", "{tmp}/nope.toml"], ["nope.toml"]),
    "missing_data": (["--data.name=fashion_mnist", "--data.root={tmp}/nope"], ["nope"]),
    "batch_too_large": (["--train.batch_size=1000"], ["train.batch_size"]),
    "existing_run_dir": (["--run.name=taken"], ["run.resume", "run.overwrite"]),
}


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory):
    """Every error case of the CLI, launched at once (each only starts Python and fails)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = {}
    for case, (extra, _) in ERROR_CASES.items():
        tmp = tmp_path_factory.mktemp(case)
        if case == "existing_run_dir":
            (tmp / "runs" / "taken").mkdir(parents=True)
            write(tmp / "runs" / "taken" / "keep.txt", "mine")
        args = [*TINY, f"--run.dir={tmp / 'runs'}", "--run.name=r",
                *[a.replace("{tmp}", str(tmp)) for a in extra]]
        procs[case] = (tmp, subprocess.Popen(
            [sys.executable, "-m", "pipemlaan.train", *args], cwd=tmp, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = {}
    for case, (tmp, p) in procs.items():
        out, err = p.communicate(timeout=300)
        done[case] = (tmp, subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in ERROR_CASES if c != "existing_run_dir"])
def test_cli_errors_exit_2_with_one_line_and_no_run_dir(error_runs, case):
    tmp, proc = error_runs[case]
    assert_one_line_error(proc, *ERROR_CASES[case][1])
    assert not (tmp / "runs" / "r").exists()


@pytest.mark.slow
def test_cli_refuses_an_existing_run_dir(error_runs):
    tmp, proc = error_runs["existing_run_dir"]
    line = assert_one_line_error(proc, *ERROR_CASES["existing_run_dir"][1])
    run = tmp / "runs" / "taken"
    assert "taken" in line
    assert sorted(p.name for p in run.iterdir()) == ["keep.txt"]
    assert (run / "keep.txt").read_text() == "mine"
    assert not (tmp / "runs" / "r").exists()


# ---- end to end --------------------------------------------------------------------------

SUMMARY_KEYS = ["method", "model", "dataset", "K", "world_size", "epochs", "steps",
                "test_top1_error", "test_top5_error", "per_module_test_error", "images_per_s",
                "wall_s", "peak_memory_bytes", "activation_bytes",
                "final_train_loss_per_module", "param_checksum"]
STEPS_PER_EPOCH = 128 // 32


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "pipemlaan.train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Run "a": 2 epochs (8 steps) of dgl+mlaan on synthetic data. Run "b", launched at the
    same time: the same configuration stopped by train.max_steps after one epoch."""
    root = tmp_path_factory.mktemp("e2e")
    args = [*TINY, f"--run.dir={root / 'runs'}", "--train.epochs=2"]
    a = launch([*args, "--run.name=a"], root)
    b = launch([*args, "--run.name=b", f"--train.max_steps={STEPS_PER_EPOCH}"], root)
    for p in (a, b):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    return root, root / "runs" / "a", [*args, "--run.name=a"]


def read_summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_cli_run_writes_config_metrics_summary_and_checkpoint(finished_run):
    root, run, args = finished_run
    K = 4
    # config.toml: valid TOML, and it loads back to the run's configuration
    text = (run / "config.toml").read_text()
    parsed = tomllib.loads(text)
    reloaded = load_config(run / "config.toml")
    assert reloaded.to_dict() == parsed
    expected = load_config(None, [a for a in args])
    assert reloaded.to_dict() == expected.to_dict()

    # metrics.jsonl: JSON lines with step, rank and per-module losses
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    assert records
    for r in records:
        assert "step" in r and r["rank"] == 0
    train = [r for r in records if "losses" in r]
    assert [r["step"] for r in train] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    # the default (reference) plan: with the stem alone, modules 0 and 1 come before the first
    # window and have no loss of their own
    HEADED = [k for k in range(K) if k >= 2]
    for r in train:
        assert sorted(r["losses"], key=int) == [str(k) for k in HEADED]
        assert all(math.isfinite(v) for v in r["losses"].values())

    # summary.json: every key of the contract
    s = read_summary(run)
    missing = [k for k in SUMMARY_KEYS if k not in s]
    assert not missing, missing
    assert s["method"] == "dgl+mlaan" and s["model"] == "resnet8"
    assert s["dataset"] == "synthetic" and s["K"] == K and s["world_size"] == 1
    assert s["epochs"] == 2 and s["steps"] == 2 * STEPS_PER_EPOCH
    assert len(s["per_module_test_error"]) == K
    assert s["per_module_test_error"][:2] == [None, None]
    assert all(0 <= e <= 100 for e in s["per_module_test_error"][2:])
    assert s["test_top1_error"] == s["per_module_test_error"][-1]
    assert 0 <= s["test_top5_error"] <= s["test_top1_error"]
    assert s["images_per_s"] > 0 and s["wall_s"] > 0
    assert len(s["peak_memory_bytes"]) == 1 and s["peak_memory_bytes"][0] > 0
    assert len(s["activation_bytes"]) == 1 and s["activation_bytes"][0] > 0
    assert len(s["final_train_loss_per_module"]) == K
    last_losses = train[-1]["losses"]
    assert s["final_train_loss_per_module"][:2] == [None, None]
    assert s["final_train_loss_per_module"][2:] == pytest.approx(
        [last_losses[str(k)] for k in HEADED])
    assert isinstance(s["param_checksum"], float) and math.isfinite(s["param_checksum"])

    # a complete checkpoint of the last step
    metas = sorted(run.glob("checkpoints/step_*/meta.json"))
    assert metas
    meta = json.loads(metas[-1].read_text())
    assert meta["step"] == s["steps"]
    assert len(meta["files"]) == K
    assert all((metas[-1].parent / name).is_file() for name in meta["files"])


@pytest.mark.slow
def test_resume_with_more_epochs_continues(finished_run, tmp_path):
    root, run, args = finished_run
    copy = tmp_path / "runs" / "a"
    shutil.copytree(run, copy)
    before = read_summary(copy)
    proc = cli(*TINY, f"--run.dir={tmp_path / 'runs'}", "--run.name=a", "--train.epochs=3",
               "--run.resume=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    after = read_summary(copy)
    assert after["steps"] == 3 * STEPS_PER_EPOCH > before["steps"]
    records = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "losses" in r]
    # the resumed run picked up at the checkpoint's step, without redoing earlier steps
    assert steps == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert after["param_checksum"] != before["param_checksum"]


@pytest.mark.slow
def test_resume_from_the_midpoint_reproduces_the_uninterrupted_run(finished_run):
    root, run, _ = finished_run
    reference = read_summary(run)["param_checksum"]
    half = read_summary(root / "runs" / "b")
    assert half["steps"] == STEPS_PER_EPOCH
    assert half["param_checksum"] != pytest.approx(reference, rel=1e-6)
    second = cli(*TINY, f"--run.dir={root / 'runs'}", "--run.name=b", "--train.epochs=2",
                 "--run.resume=true", cwd=root)
    assert second.returncode == 0, second.stderr
    full = read_summary(root / "runs" / "b")
    assert full["steps"] == 2 * STEPS_PER_EPOCH
    assert full["param_checksum"] == pytest.approx(reference, rel=1e-9, abs=0)
    want = read_summary(run)["final_train_loss_per_module"]
    assert full["final_train_loss_per_module"][:2] == want[:2] == [None, None]
    assert full["final_train_loss_per_module"][2:] == pytest.approx(want[2:], rel=1e-6)


def test_a_renamed_key_still_works_with_a_notice(capsys, tmp_path):
    """pipeline.microbatches (batches in flight, not micro-batches) is now pipeline.in_flight;
    the old name, on the command line or in a TOML file, sets the new key and says so once."""
    cfg = load_config(None, ["--pipeline.microbatches=3"])
    assert cfg.pipeline.in_flight == 3
    assert "pipeline.microbatches is now pipeline.in_flight" in capsys.readouterr().err
    path = tmp_path / "old.toml"
    path.write_text("[pipeline]\nmicrobatches = 4\n")
    assert load_config(path).pipeline.in_flight == 4
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err
