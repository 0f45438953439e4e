"""ROAM benchmarks run end to end in smoke mode and write their results (numbers are never asserted)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.filterwarnings("ignore")
def test_preprocessing_bench_quick_writes_json_and_table(tmp_path) -> None:
    from msfm.bench.roam import run_bench

    res = run_bench(tmp_path, quick=True)
    saved = json.loads((tmp_path / "roam_bench.json").read_text())
    assert saved["quick"] is True
    assert {r["mode"] for r in saved["rows"]} == {"pipeline", "naive"}
    for row in saved["rows"]:
        assert row["patches_per_s"] > 0
    assert "speed-up vs naive" in res["markdown"]
    assert (tmp_path / "roam_bench.md").read_text().startswith(res["markdown"].splitlines()[0])


def test_model_cost_bench_small(tmp_path) -> None:
    from msfm.bench.roam_model import model_flops_per_roi, run_model_bench
    from msfm.registry import preset_config

    res = run_model_bench(tmp_path, ks=(2,), train_ks=(2,), preset="roam-tiny", repeats=1, threads=1)
    rows = json.loads((tmp_path / "roam_model_bench.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["inference", "train"]
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    cfg = preset_config("roam-tiny")
    assert rows[0]["gflops"] == pytest.approx(2 * model_flops_per_roi(cfg) / 1e9)
    assert "| inference | 2 |" in res["markdown"]
