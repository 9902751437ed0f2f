"""Fault handling of `python -m pipemlaan.train`, alone, under torchrun, and as plain processes.

Run:
  cd /work/main && OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_faults.py -q --durations=10

- a rank killed with SIGKILL: torchrun stops the job and names rank 1; without torchrun, the
  surviving ranks' own timeouts and heartbeats stop them with a line naming the dead rank;
- torchrun --max-restarts=1 restarts killed workers, which resume from the last checkpoint by
  themselves and end with the parameters of an uninterrupted run (plain torchrun);
- checkpoints: a truncated or corrupted newest checkpoint is skipped with a warning and the run
  resumes from the older one; an incomplete one (no meta.json) is ignored; the module files
  load with torch.load(weights_only=True);
- a NaN/Inf loss stops the run naming rank, module and step (or is skipped on request);
- configuration and data errors are found before any compute, on every rank, quickly, with one
  line naming the key, and leave no run directory;
- an unwritable run directory and a full disk (RLIMIT_FSIZE) are named errors, and a failed
  checkpoint leaves the earlier one intact.

Every launch is a subprocess in a session of its own with a timeout; the `finally` of each
launch kills its process group, every worker torchrun started (they run in sessions of their
own) and any process carrying the test's unique run name, so nothing is left behind.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch

from inprocess import run_ranks
from launching import (_env, complete_checkpoints, environ, error_lines, flat_tensors,
                       free_port, launched, run_to_end, train_cmd, train_ranks, unique_name,
                       wait_until, worker_tracebacks)

EXIT_AFTER_KILL_S = 60   # a dead rank must end the job within this
VALIDATION_S = 25        # a start-up error's launch is given 2 x this (+30 s) before it hangs

TINY = ["--data.name=synthetic", "--data.synthetic_size=256", "--data.synthetic_image=[1,16,16]",
        "--model.name=resnet8", "--model.K=4",
        "--method.first_modules_head=true", "--method.heads=compact",
        "--train.batch_size=16", "--run.progress=false",
        "--pipeline.timeout_s=30", "--train.device=cpu"]
STEPS_PER_EPOCH = 256 // 16


# ---- 1. a dead rank under torchrun -----------------------------------------------------------
def test_dead_rank_under_torchrun_is_named(tmp_path):
    name = unique_name("dead-torchrun")
    args = [*TINY, "--data.synthetic_size=8192", "--train.epochs=3", "--pipeline.mode=async",
            "--run.log_every=1", f"--run.dir={tmp_path / 'runs'}", f"--run.name={name}"]
    metrics = tmp_path / "runs" / name / "metrics.jsonl"
    with launched([(train_cmd(3, args), tmp_path / "torchrun", None)], name) as (proc,):
        wait_until(lambda: train_ranks(metrics) == {0, 1, 2}, 180, [proc],
                   "training lines from every rank")
        workers = {pid: environ(pid) for pid in proc.remember_workers()}
        rank1 = [pid for pid, env in workers.items()
                 if env.get("RANK") == "1" and env.get("WORLD_SIZE") == "3"]
        assert len(rank1) == 1, f"rank 1's worker not found among {workers.keys()}"
        os.kill(rank1[0], signal.SIGKILL)
        t_kill = time.monotonic()
        rc = proc.wait(EXIT_AFTER_KILL_S)
        took = time.monotonic() - t_kill
        out = proc.stdout + proc.stderr
    assert rc != 0, proc.describe()
    assert took < EXIT_AFTER_KILL_S
    # torchrun's failure report names the killed worker, or our own watchdog does
    root_cause = out.split("Root Cause", 1)[1] if "Root Cause" in out else ""
    torchrun_names_it = re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9",
                                  root_cause) and "SIGKILL" in root_cause
    assert torchrun_names_it or "rank 1 stopped" in out, out[-6000:]


# ---- 2. a dead rank without torchrun: our watchdog and timeouts -----------------------------
@pytest.mark.parametrize("world,victim,mode", [(3, 2, "async")], ids=["3-ranks-kill-2-async"])
def test_dead_rank_without_torchrun_is_named_by_heartbeats(tmp_path, world, victim, mode):
    """Plain processes (no launcher to stop the others): the survivors' own timeouts and
    heartbeats end them, each with one line; the dead rank's left neighbour names it. The
    victim is never rank 0, which hosts the store."""
    name = unique_name("dead-plain")
    args = [*TINY, "--data.synthetic_size=8192", "--train.epochs=3", f"--pipeline.mode={mode}",
            "--run.log_every=1", f"--run.dir={tmp_path / 'runs'}", f"--run.name={name}"]
    metrics = tmp_path / "runs" / name / "metrics.jsonl"
    port = free_port()
    cmds = [(train_cmd(1, args), tmp_path / f"rank{r}",
             _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                  WORLD_SIZE=str(world), LOCAL_RANK=str(r)))
            for r in range(world)]
    survivors = [r for r in range(world) if r != victim]
    with launched(cmds, name) as procs:
        wait_until(lambda: train_ranks(metrics) == set(range(world)), 180, procs,
                   "training lines from every rank")
        os.kill(procs[victim].pid, signal.SIGKILL)
        t_kill = time.monotonic()
        rcs = {r: procs[r].wait(max(1.0, EXIT_AFTER_KILL_S - (time.monotonic() - t_kill)))
               for r in survivors}
        took = time.monotonic() - t_kill
        errs = {r: procs[r].stderr for r in survivors}
        described = "\n".join(f"--- rank {r} ---\n{procs[r].describe()}" for r in survivors)
    assert took < EXIT_AFTER_KILL_S, described
    # a pipeline failure is exit status 1, reported as one line (no traceback, no abort)
    assert rcs == {r: 1 for r in survivors}, described
    for r in survivors:
        assert worker_tracebacks(errs[r]) == 0, described
        assert len(error_lines(errs[r])) == 1, described
        assert error_lines(errs[r])[0].startswith(f"pipemlaan: error: rank {r}:"), described
    # the neighbour that lost its link to the victim names it from the heartbeats
    line = error_lines(errs[victim - 1])[0]
    assert re.search(rf"\brank {victim} stopped|\branks [\d, ]*\b{victim}\b[\d, ]* stopped",
                     line), described


# ---- 3. torchrun --max-restarts=1: automatic resume ------------------------------------------
RESTART_ARGS = [*TINY, "--data.synthetic_image=[1,24,24]", "--train.epochs=2",
                "--pipeline.mode=lockstep", "--run.checkpoint_steps=4", "--run.log_every=1"]
RESTART_STEPS = 2 * STEPS_PER_EPOCH
RESTART_TIMEOUT_S = 120   # a healthy restart and finish takes 15-30 s on 2 busy cores


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    """The single-process run of the restart test's configuration, never interrupted."""
    root = tmp_path_factory.mktemp("restart-ref")
    name = unique_name("restart-ref")
    proc = run_to_end(train_cmd(1, [*RESTART_ARGS, f"--run.dir={root}", f"--run.name={name}"]),
                      root / "launch", name)
    assert proc.popen.returncode == 0, proc.describe()
    return root / name


def test_torchrun_restart_resumes_and_matches_uninterrupted_run(tmp_path, uninterrupted_run):
    """Plain torchrun, as a user gets it: the restarted ranks start in whatever order."""
    name = unique_name("restart")
    args = [*RESTART_ARGS, f"--run.dir={tmp_path / 'runs'}", f"--run.name={name}"]
    run_dir = tmp_path / "runs" / name
    cmd = train_cmd(2, args, restarts=1)
    with launched([(cmd, tmp_path / "torchrun", _env())], name) as (proc,):
        wait_until(lambda: complete_checkpoints(run_dir), 120, [proc], "a first checkpoint",
                   every=0.02)
        workers = {pid: environ(pid) for pid in proc.remember_workers()}
        rank1 = [pid for pid, env in workers.items()
                 if env.get("RANK") == "1" and env.get("TORCHELASTIC_RESTART_COUNT") == "0"]
        assert len(rank1) == 1, f"rank 1's worker not found among {workers.keys()}"
        os.kill(rank1[0], signal.SIGKILL)
        rc = proc.wait(RESTART_TIMEOUT_S)
        out, described = proc.stdout, proc.describe()
    assert rc == 0, described
    assert "restart 1: resuming from the last checkpoint" in out, described
    m = re.search(r"resumed from \S*step_(\d+) at step (\d+)", out)
    assert m, described
    resumed_at = int(m.group(2))
    assert 4 <= resumed_at < RESTART_STEPS and resumed_at % 4 == 0, \
        f"the kill did not land mid-run\n{described}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == RESTART_STEPS and summary["world_size"] == 2

    final = complete_checkpoints(run_dir)[-1]
    ref_final = complete_checkpoints(uninterrupted_run)[-1]
    assert final.name == ref_final.name == f"step_{RESTART_STEPS:08d}"
    for k in range(4):
        got = flat_tensors(torch.load(final / f"module_{k:03d}.pt", weights_only=True))
        want = flat_tensors(torch.load(ref_final / f"module_{k:03d}.pt", weights_only=True))
        assert got.keys() == want.keys(), f"module {k}: different state keys"
        for key, w in want.items():
            if isinstance(w, torch.Tensor):
                torch.testing.assert_close(got[key], w, rtol=1e-5, atol=1e-7,
                                           msg=lambda s: f"module {k} {key}: {s}")
            else:
                assert got[key] == w, f"module {k} {key}: {got[key]!r} != {w!r}"
    ref_summary = json.loads((uninterrupted_run / "summary.json").read_text())
    assert summary["param_checksum"] == pytest.approx(ref_summary["param_checksum"], rel=1e-5)


# ---- 4. checkpoint integrity -----------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished single-process run of 2 epochs: checkpoints at steps 16 and 32."""
    root = tmp_path_factory.mktemp("ckpt-base")
    run_ranks([*TINY, "--train.epochs=2", f"--run.dir={root}", "--run.name=ckpt"], 1)
    run_dir = root / "ckpt"
    assert [p.name for p in complete_checkpoints(run_dir)] == \
        [f"step_{STEPS_PER_EPOCH:08d}", f"step_{2 * STEPS_PER_EPOCH:08d}"]
    return run_dir


def _copy_run(base: Path, tmp_path: Path) -> tuple[Path, str]:
    name = unique_name("ckpt-case")
    dst = tmp_path / "runs" / name
    shutil.copytree(base, dst)
    return dst, name


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "flipped-bytes"])
def test_damaged_newest_checkpoint_falls_back_and_resumes(finished_run, tmp_path, damage,
                                                          capsys):
    from pipemlaan.checkpoint_files import latest_checkpoint
    run_dir, name = _copy_run(finished_run, tmp_path)
    older, newest = complete_checkpoints(run_dir)
    assert latest_checkpoint(run_dir)[0] == newest            # intact: the newest
    damage(newest / "module_001.pt")
    with pytest.warns(UserWarning, match=r"truncated or corrupted"):
        found = latest_checkpoint(run_dir)
    assert found is not None and found[0] == older and found[1]["step"] == STEPS_PER_EPOCH

    with pytest.warns(UserWarning, match=r"truncated or corrupted"):
        run_ranks([*TINY, "--train.epochs=3", "--run.resume=true",
                   f"--run.dir={tmp_path / 'runs'}", f"--run.name={name}"], 1)
    out = capsys.readouterr().out.replace("\n", "")    # rich wraps at 80 columns here
    assert re.search(rf"resumed from \S*{older.name} at step {STEPS_PER_EPOCH}\b", out), out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 * STEPS_PER_EPOCH
    # the damaged checkpoint was rewritten whole by the resumed run
    assert latest_checkpoint(run_dir)[1]["step"] == 3 * STEPS_PER_EPOCH


def test_missing_module_file_falls_back(finished_run, tmp_path):
    from pipemlaan.checkpoint_files import latest_checkpoint
    run_dir, _ = _copy_run(finished_run, tmp_path)
    older, newest = complete_checkpoints(run_dir)
    (newest / "module_003.pt").unlink()
    with pytest.warns(UserWarning, match=r"truncated or corrupted"):
        assert latest_checkpoint(run_dir)[0] == older
    # both damaged: nothing to resume from
    _truncate(older / "module_000.pt")
    with pytest.warns(UserWarning):
        assert latest_checkpoint(run_dir) is None


def test_incomplete_checkpoint_without_meta_is_ignored(finished_run, tmp_path):
    from pipemlaan.checkpoint_files import latest_checkpoint
    run_dir, _ = _copy_run(finished_run, tmp_path)
    newest = complete_checkpoints(run_dir)[-1]
    partial = run_dir / "checkpoints" / f"step_{10 * STEPS_PER_EPOCH:08d}"
    partial.mkdir()
    for f in newest.glob("module_*.pt"):
        shutil.copy(f, partial / f.name)   # whole module files, but meta.json was never written
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # an incomplete checkpoint is not worth a warning
        found = latest_checkpoint(run_dir)
    assert found is not None and found[0] == newest
    assert found[1]["step"] == 2 * STEPS_PER_EPOCH


def test_module_files_load_with_weights_only_and_match_meta(finished_run):
    import hashlib
    for d in complete_checkpoints(finished_run):
        meta = json.loads((d / "meta.json").read_text())
        assert sorted(meta["files"]) == [f"module_{k:03d}.pt" for k in range(4)]
        for fname, digest in meta["files"].items():
            path = d / fname
            assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
            state = torch.load(path, map_location="cpu", weights_only=True)
            assert set(state) >= {"module", "optimizer"}
            assert state["module"] and all(isinstance(v, torch.Tensor)
                                           for v in state["module"].values())
        assert not list(d.glob("*.tmp")), f"{d}: temporary files left behind"


# ---- 5. NaN / Inf ----------------------------------------------------------------------------
NONFINITE = re.compile(r"^pipemlaan: error: .*\brank (\d+)\b.*\bmodule (\d+)\b.*\bstep (\d+)\b",
                       re.M)


# one process: tests/test_no_host_sync.py plants a NaN at a known step, in both modes
@pytest.mark.parametrize("ranks", [2])
def test_nonfinite_loss_stops_naming_rank_module_step(tmp_path, ranks):
    name = unique_name(f"nan{ranks}")
    args = [*TINY, "--train.lr=1e6", "--train.epochs=2", "--pipeline.mode=lockstep",
            f"--run.dir={tmp_path / 'runs'}", f"--run.name={name}"]
    proc = run_to_end(train_cmd(ranks, args), tmp_path / "launch", name)
    assert proc.popen.returncode == 1, proc.describe()
    hits = NONFINITE.findall(proc.stderr_text)
    assert len(hits) == 1, proc.describe()
    rank, module, step = map(int, hits[0])
    assert 0 <= rank < ranks and 0 <= module < 4 and 0 <= step < 2 * STEPS_PER_EPOCH
    assert worker_tracebacks(proc.stderr_text) == 0, proc.describe()
    assert not (tmp_path / "runs" / name / "summary.json").exists()


def test_nonfinite_skip_finishes(tmp_path):
    """2 ranks (in one process, a thread each): non-finite batches are dropped, the run ends."""
    args = [*TINY, "--train.lr=1e6", "--train.epochs=2", "--pipeline.mode=lockstep",
            "--train.nonfinite=skip", f"--run.dir={tmp_path / 'runs'}", "--run.name=nanskip"]
    summary = run_ranks(args, 2)["summary"]
    assert summary["steps"] == 2 * STEPS_PER_EPOCH and summary["world_size"] == 2
    assert sum(summary["skipped_updates"].values()) > 0, "lr=1e6 gave no non-finite update"


def test_nonfinite_skip_leaves_no_batch_pending(tmp_path):
    """In process, one rank: a skipped batch must still complete its window bookkeeping (zero
    gradients), or every skipped batch keeps its graph alive and a pipeline neighbour waits
    for window gradients that never come."""
    from pipemlaan.config import load_config
    from pipemlaan.engine.distributed import DistEnv
    from pipemlaan.engine.trainer import Trainer

    cfg = load_config(None, [*TINY, "--train.lr=1e6", "--train.nonfinite=skip",
                             "--train.epochs=1", f"--run.dir={tmp_path / 'runs'}",
                             "--run.name=skip"])
    trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"), None))
    try:
        summary = trainer.train()
    finally:
        trainer.close()
    assert summary["steps"] == STEPS_PER_EPOCH
    assert trainer.stage.skipped, "lr=1e6 should have produced non-finite losses"
    assert not trainer.stage.pending, \
        f"batches never finalised (step, module): {sorted(trainer.stage.pending)}"


# ---- 6. validation before any compute, on every rank -----------------------------------------
VALIDATION_CASES = {
    # case: (ranks, extra args (a callable of tmp_path gives them), text the error names); the
    # errors load_config finds alone, and the data's others, are checked without processes in
    # test_config_cli.py and test_data.py
    "world-larger-than-K": (3, ["--model.K=2"], "model.K"),
    "partition-below-window": (3, ["--method.window=3", "--pipeline.partition=[1,1,2]"],
                               "pipeline.partition"),
    "fashion-missing": (2, lambda t: ["--data.name=fashion_mnist", f"--data.root={t / 'none'}"],
                        "data.root"),
    "batch-larger-than-data": (2, ["--train.batch_size=512"], "train.batch_size"),
}


def _validation_args(tmp_path: Path, case: str) -> tuple[int, list[str], str, Path, str]:
    ranks, extra, key = VALIDATION_CASES[case]
    extra = extra(tmp_path) if callable(extra) else extra
    name = unique_name(f"val-{case}")
    runs = tmp_path / "runs"
    args = [*TINY, *extra, "--pipeline.mode=async", f"--run.dir={runs}", f"--run.name={name}"]
    return ranks, args, key, runs, name


# under torchrun: one error found by every rank alike, one on rank 0 alone (the data); the
# errors found before the process group exit 2 alone (test_config_cli.py), and the broadcast
# lengths' case is checked without torchrun below, where no launcher stops a waiting rank
TORCHRUN_CASES = ["world-larger-than-K", "fashion-missing"]


@pytest.mark.parametrize("case", TORCHRUN_CASES)
def test_startup_error_under_torchrun_is_quick_and_named(tmp_path, case):
    ranks, args, key, runs, name = _validation_args(tmp_path, case)
    proc = run_to_end(train_cmd(ranks, args), tmp_path / "launch", name,
                      timeout=2 * VALIDATION_S + 30)
    assert proc.popen.returncode != 0, proc.describe()
    # no rank sat waiting for a peer that had given up: that would end in a timeout's line
    # (exit 1, "timed out" / "stalled"), not in the configuration's (exit 2, checked below)
    lines = error_lines(proc.stderr_text)
    # torchrun stops the other workers as soon as one exits, so a slower rank may be stopped
    # before it prints: at least one line, and every line printed names the key
    assert 1 <= len(lines) <= ranks, proc.describe()
    for line in lines:
        assert key in line, proc.describe()
        assert "stalled" not in line and "died" not in line, proc.describe()
    if case == "world-larger-than-K":     # the same one line from every rank, naming the world
        assert len(set(lines)) == 1 and f"{ranks} ranks" in lines[0], proc.describe()
    assert worker_tracebacks(proc.stderr_text) == 0, proc.describe()
    # the first worker to fail exited with the configuration/data status
    root_cause = proc.stderr_text.split("Root Cause", 1)[-1]
    assert re.search(r"^\s*exitcode\s+:\s*2 ", root_cause, re.M), proc.describe()
    assert not (runs / name).exists(), f"{runs / name} was created"


# load_config errors (unknown model or method) come before any process group: every rank
# finds them alone. The others are found once the process group is up, on one rank (data:
# rank 0) or all, and must reach every rank through agree() / the broadcast lengths.
# (world-larger-than-K, found by every rank alike, is checked under torchrun above)
COLLECTIVE_CASES = ["partition-below-window", "fashion-missing",
                    "batch-larger-than-data"]     # the data's other errors: tests/test_data.py


@pytest.mark.parametrize("case", COLLECTIVE_CASES)
def test_startup_error_reaches_every_rank_without_torchrun(tmp_path, case):
    """Plain processes, so no launcher stops a rank that is left waiting: each rank must
    exit by itself, with status 2 and its own line naming the key, long before the timeout."""
    ranks, args, key, runs, name = _validation_args(tmp_path, case)
    port = free_port()
    cmds = [(train_cmd(1, args), tmp_path / f"rank{r}",
             _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                  WORLD_SIZE=str(ranks), LOCAL_RANK=str(r)))
            for r in range(ranks)]
    with launched(cmds, name) as procs:
        rcs = [p.wait(2 * VALIDATION_S + 30) for p in procs]
        errs = [p.stderr for p in procs]
        described = "\n".join(p.describe() for p in procs)
    assert rcs == [2] * ranks, described
    for err in errs:
        lines = error_lines(err)
        assert len(lines) == 1 and key in lines[0], described
        assert worker_tracebacks(err) == 0, described
    assert not (runs / name).exists(), f"{runs / name} was created"


# ---- 7. unwritable run directory, full disk --------------------------------------------------
def test_run_dir_below_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    name = unique_name("unwritable")
    proc = run_to_end(train_cmd(1, [*TINY, f"--run.dir={tmp_path / 'afile' / 'runs'}",
                                    f"--run.name={name}"]), tmp_path / "launch", name)
    assert proc.popen.returncode == 2, proc.describe()
    lines = error_lines(proc.stderr_text)
    assert len(lines) == 1 and "--run.dir" in lines[0], proc.describe()
    assert worker_tracebacks(proc.stderr_text) == 0, proc.describe()


def test_full_disk_checkpoint_error_keeps_earlier_checkpoint(tmp_path):
    from pipemlaan.checkpoint_files import latest_checkpoint
    from pipemlaan.config import load_config
    from pipemlaan.engine.distributed import DistEnv
    from pipemlaan.engine.trainer import Trainer
    from pipemlaan.errors import PipemlaanError

    assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN   # Python ignores SIGXFSZ
    cfg = load_config(None, [*TINY, "--train.epochs=1", f"--run.dir={tmp_path / 'runs'}",
                             "--run.name=full"])
    trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu"), None))
    try:
        trainer.train()
        run_dir = tmp_path / "runs" / "full"
        before = latest_checkpoint(run_dir)
        assert before is not None and before[1]["step"] == STEPS_PER_EPOCH
        smallest = min(p.stat().st_size for p in before[0].glob("module_*.pt"))
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        trainer.step += 1
        resource.setrlimit(resource.RLIMIT_FSIZE, (smallest // 2, hard))
        try:
            with pytest.raises(PipemlaanError) as info:
                trainer.save_checkpoint()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    finally:
        trainer.close()
    msg = str(info.value)
    assert "cannot write checkpoint" in msg and "--run.dir" in msg, msg
    assert "\n" not in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        after = latest_checkpoint(run_dir)
    assert after is not None and after[0] == before[0] and after[1] == before[1]
