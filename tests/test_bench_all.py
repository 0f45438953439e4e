"""`msfm bench all --quick` on a small section subset writes JSON + markdown with the machine line."""

from __future__ import annotations

import json

import pytest

from msfm.cli import main


def test_bench_all_quick_writes_json_and_markdown(tmp_path, capsys) -> None:
    main(["bench", "all", "--quick", "--sections", "roam,ddp", "--device", "cpu", "-o", str(tmp_path)])
    res = json.loads((tmp_path / "bench_all.json").read_text())
    assert {"machine", "matmul_gflops", "rows", "ddp", "quick", "sections", "markdown"} <= set(res)
    assert {"cpu_model", "torch_capability", "flags", "bf16_hardware", "cores", "torch", "line"} <= set(
        res["machine"]
    )
    assert {"fp32", "bf16"} <= set(res["matmul_gflops"])
    rows = res["rows"]
    assert [r["family"] for r in rows] == ["roam", "roam"]
    assert rows[0]["ratio_vs_official"] == pytest.approx(1.0)
    for r in rows:
        assert {"per_s", "ratio_vs_official", "fraction_of_matmul", "peak_rss_mb", "precision"} <= set(r)
        assert r["per_s"] > 0
        assert r["peak_rss_mb"] > 0
    assert "skipped" in res["ddp"]
    md = (tmp_path / "bench_all.md").read_text()
    assert md.startswith("**Machine:** ")
    assert res["machine"]["line"] in md
    assert "QUICK run" in md
    assert "### roam" in md
    assert "2-GPU DDP step skipped" in md
    assert "**Machine:**" in capsys.readouterr().out


def test_bench_all_unknown_section_is_an_input_error(tmp_path) -> None:
    with pytest.raises(SystemExit) as err:
        main(["bench", "all", "--sections", "nope", "-o", str(tmp_path)])
    assert err.value.code == 2
