"""`msfm datasets`, `msfm bench *` and `msfm demo` through the command line (``msfm.cli.main``).

The benchmarks and the demo themselves are exercised at full size elsewhere (tests/test_bench_*.py, the slow
tests/test_demo.py, which also goes through ``msfm demo``). Here every command is invoked the way a user types it,
with its quickest real options; where even the quickest run takes minutes (the bf16 matmul rate of
``bench scfoundation`` on a CPU without bf16 units: ~20 s per multiply, the MLP/GP baselines of
``bench gest``'s quality run: ~100 s, ``bench roam --quick``: ~20 s), the heavy function is replaced by a smaller
call or a recorder, and the test checks what the command passed to it and what it printed and wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pytest

from cli_runner import run_cli
from msfm.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


run = run_cli


# --- msfm datasets ---------------------------------------------------------------------------------------------


def test_datasets_list_prints_a_readable_table(capsys):
    import msfm.datasets

    assert run("datasets", "list") == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert lines[0].split() == ["name", "kind", "size", "source", "licence"]
    assert "{" not in out  # no raw JSON
    pbmc = next(line for line in lines if line.startswith("pbmc68k "))
    assert "700 x 765" in pbmc
    assert "real" in pbmc
    names = [line.split()[0] for line in lines[2:] if line.strip() and not line.startswith("msfm ")]
    assert names == list(msfm.datasets.list_datasets())
    assert "--json" in out


def test_datasets_list_json_prints_one_json_line_per_dataset(capsys):
    import msfm.datasets

    assert run("datasets", "list", "--json") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in lines]
    expected = msfm.datasets.list_datasets()
    assert [r["name"] for r in rows] == list(expected)
    assert {"pbmc68k", "scc_st", "semi_real_tissue", "histology_cohort"} <= set(expected)
    pbmc = next(r for r in rows if r["name"] == "pbmc68k")
    assert pbmc["shape"] == [700, 765]
    for row in rows:  # every dataset states where it comes from and under which licence
        assert all(row[k] for k in ("source", "licence", "function")), row["name"]


def test_datasets_export_writes_the_dataset(tmp_path, capsys):
    import msfm.datasets

    out = tmp_path / "scc.h5ad"
    assert run("datasets", "export", "scc_st", "-o", out) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    got, want = ad.read_h5ad(out), msfm.datasets.scc_st()
    assert got.shape == want.shape == (621, 2000)
    np.testing.assert_array_equal(np.asarray(got.obsm["spatial"]), np.asarray(want.obsm["spatial"]))
    assert list(got.var_names) == list(want.var_names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scc.h5ad"]  # no temporary left


# --- msfm bench --------------------------------------------------------------------------------------------------


def test_bench_scfoundation_flops_section(tmp_path, capsys, monkeypatch):
    """The real command and code path, with a small matmul (the real 4096x768x3072 bf16 one takes minutes here)."""
    import msfm.bench.scfoundation as bench

    calls: list[Any] = []
    real_rate = bench.matmul_rate

    def small_rate(dtype, device, **_kw):
        calls.append(dtype)
        return real_rate(dtype, device, m=64, k=32, n=48, repeats=2)

    monkeypatch.setattr(bench, "matmul_rate", small_rate)
    out = tmp_path / "bench"
    assert run("bench", "scfoundation", "--quick", "--device", "cpu", "--sections", "flops", "-o", out) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "scfoundation.json").read_text())
    assert printed == saved
    assert saved["quick"] is True
    assert saved["machine"]["device"] == "cpu"
    assert set(saved["matmul_gflops"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in saved["matmul_gflops"].values())
    assert not {"speed", "rss"} & set(saved)  # only the section asked for
    assert len(calls) == 2


def test_bench_scmulan_passes_its_options(tmp_path, capsys, monkeypatch):
    """`bench scmulan` (its quick run is tests/test_bench_scmulan.py): options parsed, markdown and path printed."""
    import msfm.bench.scmulan as bench

    seen: dict[str, Any] = {}

    def fake(out, **kw):
        seen.update(out=Path(out), **kw)
        return {"markdown": "| msfm batched | 1 |"}

    monkeypatch.setattr(bench, "run_benchmarks", fake)
    assert (
        run(
            "bench",
            "scmulan",
            "--quick",
            "--device",
            "cpu",
            "--sections",
            "annotation, generation",
            "-o",
            tmp_path,
        )
        == 0
    )
    assert seen == {"out": tmp_path, "quick": True, "device": "cpu", "sections": ["annotation", "generation"]}
    assert capsys.readouterr().out.splitlines() == [
        "| msfm batched | 1 |",
        f"results: {tmp_path / 'scmulan_bench.json'}",
    ]


def test_bench_roam_passes_its_options(tmp_path, capsys, monkeypatch):
    """`bench roam` (its quick run is tests/test_bench_roam.py): --rois is merged into the default ROI counts."""
    import msfm.bench.roam as bench

    seen: dict[str, Any] = {}

    def fake(out, **kw):
        seen.update(out=Path(out), **kw)
        return {"markdown": "speed-up vs naive"}

    monkeypatch.setattr(bench, "run_bench", fake)
    code = run(
        "bench", "roam", "--quick", "--encoders", "colour_stats", "--rois", "colour_stats=3", "--repeats", "1",
        "--threads", "1", "-o", tmp_path,
    )  # fmt: skip
    assert code == 0
    assert seen["encoders"] == ("colour_stats",)
    assert seen["rois"] == {**bench.DEFAULT_ROIS, "colour_stats": 3}
    assert (seen["quick"], seen["repeats"], seen["threads"], seen["out"]) == (True, 1, 1, tmp_path)
    assert capsys.readouterr().out.splitlines() == [
        "speed-up vs naive",
        f"results: {tmp_path / 'roam_bench.json'}",
    ]


def test_bench_roam_model_runs_the_released_size(tmp_path, capsys):
    """`bench roam-model`, for real: the released-size model on 2 ROIs, inference only, in its own process."""
    assert run("bench", "roam-model", "--ks", "2", "--train-ks", ",", "--threads", "1", "-o", tmp_path) == 0
    rows = json.loads((tmp_path / "roam_model_bench.json").read_text())["rows"]
    assert [(r["mode"], r["k"]) for r in rows] == [("inference", 2)]
    assert rows[0]["seconds"] > 0
    assert rows[0]["peak_rss_mb"] > 0
    assert "| inference | 2 |" in capsys.readouterr().out


def test_bench_gest_runs_the_parts_asked_for(tmp_path, capsys, monkeypatch):
    import msfm.bench.gest as bench

    calls: list[tuple[str, dict[str, Any]]] = []

    def quality(out, **kw):
        calls.append(("quality", {"out": Path(out), **kw}))
        return {"markdown": "quality table"}

    def speed(out, **kw):
        calls.append(("speed", {"out": Path(out), **kw}))
        return {"markdown": "speed table"}

    monkeypatch.setattr(bench, "run_quality_bench", quality)
    monkeypatch.setattr(bench, "run_speed_bench", speed)
    code = run(
        "bench", "gest", "--steps", "3", "--preset", "gest-tiny", "--n-metacells", "16", "--speed-presets",
        "gest-tiny, gest-small", "--n-cells", "20", "--n-context", "5", "--threads", "1", "-o", tmp_path,
    )  # fmt: skip
    assert code == 0
    assert calls == [
        ("quality", {"out": tmp_path, "preset": "gest-tiny", "steps": 3, "n_metacells": 16}),
        (
            "speed",
            {
                "out": tmp_path,
                "presets": ("gest-tiny", "gest-small"),
                "n_cells": 20,
                "n_context": 5,
                "threads": 1,
            },
        ),
    ]
    assert capsys.readouterr().out.splitlines() == ["quality table", "speed table"]
    calls.clear()
    assert run("bench", "gest", "--skip-speed", "-o", tmp_path) == 0
    assert [c[0] for c in calls] == ["quality"]
    calls.clear()
    assert run("bench", "gest", "--skip-quality", "-o", tmp_path) == 0
    assert [c[0] for c in calls] == ["speed"]


# --- msfm demo ---------------------------------------------------------------------------------------------------


def test_demo_runs_every_part_and_writes_the_report(tmp_path, capsys, monkeypatch):
    """`msfm demo --quick`: every part runs with quick=True into OUT, in order, and report.md / metrics.json are
    written from what the parts return. The parts are recorders here; the real quick demo goes through the same
    command in tests/test_demo.py (slow)."""
    import importlib

    from msfm.demo import PARTS

    order: list[tuple[str, Path, bool, int]] = []
    for part in PARTS:
        module = importlib.import_module(f"msfm.demo.{part}")

        def fake_run(out, *, quick=False, seed=0, _part=part):
            order.append((_part, Path(out), quick, seed))
            return {"part": _part, "value": len(order)}

        monkeypatch.setattr(module, "run", fake_run)
        monkeypatch.setattr(module, "report_section", lambda m: f"## {m['part']} section\n")
    out = tmp_path / "demo"
    assert run("demo", "--quick", "-o", out) == 0
    assert order == [(p, out, True, 0) for p in PARTS]
    report = out / "report.md"
    assert capsys.readouterr().out.strip().splitlines() == [
        f"report: {report} (the same with figures inlined, one file: {out / 'report.html'})",
        f"explore the slides, spots and cells in a browser: msfm view {out}",
    ]
    text = report.read_text()
    assert text.startswith("# msfm demo report\n")
    # The HTML twin carries the same sections.
    html = (out / "report.html").read_text()
    assert all(f"{p} section</h2>" in html for p in PARTS)
    positions = [text.index(f"## {p} section") for p in PARTS]
    assert positions == sorted(positions)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {p: metrics[p] for p in PARTS} == {p: {"part": p, "value": i + 1} for i, p in enumerate(PARTS)}
    assert metrics["total_s"] >= 0
    assert (out / "figures").is_dir()


def test_bench_creates_its_results_folder_before_any_compute(tmp_path, monkeypatch):
    import msfm.bench.roam_model as roam_model

    seen = {}

    def fake(out, **kwargs):
        seen["exists"] = Path(out).is_dir()
        return {"markdown": "ok"}

    monkeypatch.setattr(roam_model, "run_model_bench", fake)
    out = tmp_path / "a" / "b"
    main(["bench", "roam-model", "--out", str(out)])
    assert seen == {"exists": True}


def test_bench_refuses_an_unwritable_results_folder_before_any_compute(tmp_path, monkeypatch, capsys):
    import errno

    import msfm.bench.roam_model as roam_model
    import msfm.runtime.atomic as atomic

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    monkeypatch.setattr(
        roam_model, "run_model_bench", lambda *a, **k: pytest.fail("computed before the check")
    )
    with pytest.raises(SystemExit) as info:
        main(["bench", "roam-model", "--out", str(tmp_path / "res")])
    assert info.value.code == 2
    assert "not writable" in capsys.readouterr().err


def test_datasets_export_refuses_an_existing_file_without_overwrite(tmp_path, capsys):

    out = tmp_path / "pbmc.h5ad"
    out.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as info:
        main(["datasets", "export", "pbmc68k", "--out", str(out)])
    assert info.value.code == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    main(["datasets", "export", "pbmc68k", "--out", str(out), "--overwrite"])
    import anndata as ad

    assert ad.read_h5ad(out).n_obs > 0
