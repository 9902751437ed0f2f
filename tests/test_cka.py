"""Tests of benchmarks/cka.py: the linear CKA function, and the whole command on two tiny runs
(bp and dgl, synthetic data, 2 training steps) trained here by `pipemlaan.train`.

Run: .venv/bin/python -m pytest -q tests/test_cka.py -p no:cacheprovider
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from benchmarks import cka
from pipemlaan.data import load_datasets

K = 3
TINY = ["--data.name=synthetic", "--data.synthetic_size=64", "--data.synthetic_image=[3,8,8]",
        "--model.name=resnet8", f"--model.K={K}", "--train.batch_size=16", "--train.max_steps=2",
        "--train.device=cpu", "--run.progress=false", "--train.seed=0"]
TEST_IMAGES = 256   # the synthetic test set: max(256, synthetic_size // 4)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA as normalised HSIC (Kornblith et al. 2019, eq. 3) with explicit n x n matrices."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)

    def hsic(k, l):
        return torch.trace(k @ h @ l @ h) / (n - 1) ** 2

    kx, ky = x @ x.T, y @ y.T
    return float(hsic(kx, ky) / torch.sqrt(hsic(kx, kx) * hsic(ky, ky)))


def test_cka_of_a_representation_with_itself_is_one_and_invariant():
    x, y = _randn(100, 30, seed=1), _randn(100, 20, seed=2)
    y = y + x[:, :20]   # related, so the invariances are checked away from 0
    assert cka.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    base = cka.linear_cka(x, y)
    assert 0.2 < base < 0.99
    assert cka.linear_cka(3.7 * x, y) == pytest.approx(base, abs=1e-12)
    assert cka.linear_cka(x, 0.01 * y) == pytest.approx(base, abs=1e-12)
    q, _ = torch.linalg.qr(_randn(30, 30, seed=3))
    assert cka.linear_cka(x @ q, y) == pytest.approx(base, abs=1e-12)
    # float32 input is computed in float64
    assert cka.linear_cka(x.float(), y.float()) == pytest.approx(base, abs=1e-6)


def test_cka_of_independent_features_is_small():
    # about 0.2 for n=200, p=q=50 (0.19..0.21 over 20 draws): chance overlap, not similarity
    got = cka.linear_cka(_randn(200, 50, seed=4), _randn(200, 50, seed=5))
    assert got < 0.3, got


def test_cka_matches_hsic_formula_and_gram_path():
    x, y = _randn(12, 5, seed=6) + 2.0, _randn(12, 7, seed=7) ** 2   # uncentred on purpose
    want = _hsic_cka(x, y)
    assert cka.linear_cka(x, y) == pytest.approx(want, abs=1e-12)
    # the Gram path the command uses, with column chunks smaller than the features
    got = cka.cka_from_grams(cka.gram(x.float(), chunk=2), cka.gram(y.float(), chunk=3))
    assert got == pytest.approx(want, abs=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """bp-s0-r1 and dgl-s0-r1, named as benchmarks.study names them."""
    from pipemlaan.train import main as train
    root = tmp_path_factory.mktemp("cka-runs")
    for method in ("bp", "dgl"):
        assert train([*TINY, f"--run.dir={root}", f"--run.name={method}-s0-r1",
                      f"--method.name={method}", "--method.mlm=false",
                      "--method.lam=false"]) == 0
    return root


def _result(out: Path) -> dict:
    (path,) = out.glob("cka-synthetic-*.json")
    assert path.with_suffix(".md").is_file() and path.with_suffix(".png").is_file()
    return json.loads(path.read_text())


def test_cka_command_on_tiny_runs(runs, tmp_path):
    out = tmp_path / "a"
    assert cka.main(["--runs", str(runs), "--methods", "dgl", "--batch", "100",
                     "--out", str(out)]) == 0
    r = _result(out)
    assert r["images"] == TEST_IMAGES and list(r["runs"]) == ["dgl"]
    got = r["runs"]["dgl"]
    assert got["K"] == K and len(got["cka"]) == K
    assert all(0.0 <= c <= 1.0 for c in got["cka"]), got["cka"]

    # independently: BP's blocks up to each dgl module's last block, on the same images
    bp_cfg, (bp,) = cka.load_run(runs / "bp-s0-r1", "")
    _, dgl = cka.load_run(runs / "dgl-s0-r1", "")
    images = load_datasets(bp_cfg.data)[1].images
    assert bp.block_range == (0, dgl[-1].block_range[1])
    with torch.no_grad():
        x = images
        for k, m in enumerate(dgl):
            x = m.body(x)
            ref = bp.body[:m.block_range[1] + 1](images)
            want = cka.linear_cka(ref.flatten(1), x.flatten(1))
            assert got["cka"][k] == pytest.approx(want, abs=1e-6), k


def test_cka_of_a_run_with_itself_is_one(runs, tmp_path):
    dgl = str(runs / "dgl-s0-r1")
    assert cka.main(["--bp", dgl, "--compare", dgl, "--images", "100", "--batch", "40",
                     "--out", str(tmp_path)]) == 0
    r = _result(tmp_path)
    assert r["images"] == 100
    assert r["runs"]["dgl"]["cka"] == pytest.approx([1.0] * K, abs=1e-6)


def test_missing_runs_are_one_line_errors(runs, tmp_path, capsys):
    assert cka.main(["--runs", str(tmp_path), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bp-s0-r1 not found" in err
    assert f"python -m benchmarks.study --epochs 1 --jobs 2 --workdir {tmp_path}" in err

    # a run folder whose training never wrote a checkpoint
    shutil.copytree(runs / "bp-s0-r1", tmp_path / "bp-s0-r1", ignore=shutil.ignore_patterns(
        "checkpoints"))
    assert cka.main(["--bp", str(tmp_path / "bp-s0-r1"), "--compare", str(runs / "dgl-s0-r1"),
                     "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no complete checkpoint" in err and "benchmarks.study" in err
    assert not list(tmp_path.glob("cka-*"))
