"""scMulan training through the engine on real bundled cells: end to end, exact resume, fine-tuning, next state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import lightning
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import msfm
from msfm.errors import MsfmInputError
from msfm.models.scmulan.decoding import DecodeOptions, generate_tokens, id_mask
from msfm.models.scmulan.loading import save_model
from msfm.models.scmulan.model import ScMulan
from msfm.models.scmulan.official import load_official_checkpoint
from msfm.models.scmulan.train_cells import next_state_partners
from msfm.models.scmulan.train_config import ScMulanTrainConfig
from msfm.models.scmulan.train_vocab import extend_vocabulary
from msfm.models.scmulan.training import grow_model
from msfm.runtime.checkpoint import load_checkpoint
from msfm.runtime.config import build_settings
from msfm.runtime.results import TrainResult
from msfm.tokenizers.cell_sentence import CellSentenceVocab

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FIXTURE = Path(__file__).parents[1] / "fixtures" / "scmulan" / "tiny_official.pt"
TINY = {"dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models train fastest on one thread; on a loaded 2-core machine more threads crawl.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pbmc() -> ad.AnnData:
    return msfm.datasets.pbmc68k()


@pytest.fixture(scope="module")
def small(pbmc) -> ad.AnnData:
    return pbmc[:200].copy()


def _cfg(steps: int, **extra) -> ScMulanTrainConfig:
    base = {
        "max_steps": steps,
        "batch_size": 4,
        "lr": 3e-3,
        "warmup_steps": 1,
        "accelerator": "cpu",
        "devices": 1,
        "checkpoint_every_n_steps": 2,
        "log_every_n_steps": 1,
        "max_genes": 48,
        "model_overrides": TINY,
        "meta_columns": {"cell_type": "cell_type"},
        "n_genes": 300,
    }
    base.update(extra)
    return build_settings(ScMulanTrainConfig, overrides={**base, "progress_bar": False})


def train(data, out, config: ScMulanTrainConfig, **kwargs) -> Path:
    """msfm.scmulan.train, returning the exported model directory."""
    result = msfm.scmulan.train(data, out, config=config, **kwargs)
    assert isinstance(result, TrainResult)
    return result.checkpoint


def load_model(path: Path, device: str = "cpu"):
    return msfm.scmulan.load(path, device=device)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "model", family="scmulan").state_dict


def _annotate(loaded, adata: ad.AnnData, rows: np.ndarray) -> list[str]:
    """Greedy, constrained annotation decoding of some cells with the loaded model."""
    from msfm.data import CellSource, GenePanel, harmonize_genes
    from msfm.data.normalize import normalized_rows

    v = loaded.vocab
    tok = msfm.scmulan.tokenizer_for(loaded)
    mapping = harmonize_genes(adata.var, GenePanel.from_symbols(v.genes), min_panel_fraction=0.0)
    x = normalized_rows(CellSource(adata), rows, mapping)
    prompts = tok.prompts(tok.gene_sentences(x), task="<PCT>")
    ids, levels, mask = tok.left_pad(prompts)
    types = id_mask(v.category_ids("cell_type"), len(v))
    res = generate_tokens(
        loaded.model,
        ids,
        levels,
        mask,
        DecodeOptions(max_new_tokens=3, repeat_mask="official"),
        allowed=[types, types, id_mask([v.end_id], len(v))],
    )
    return [v.token(int(i)) for i in res.ids[:, 1]]


def test_train_end_to_end_exports_a_loadable_model(pbmc, tmp_path):
    before = pbmc.copy()
    run = tmp_path / "run"
    result = msfm.scmulan.train(
        pbmc,
        run,
        config=_cfg(30, checkpoint_every_n_steps=10, n_genes=2000, max_genes=None),
        batch_size=8,
        val_fraction=0.1,
    )
    model_dir = result.checkpoint
    assert model_dir == run / "model"
    assert result.run_dir == run
    assert result.metrics["step"] == 29
    assert np.isfinite(result.metrics["train/loss"])
    assert np.isfinite(result.metrics["val/loss"])
    assert msfm.scmulan.load(result, device="cpu").meta == load_model(model_dir).meta  # path-like result
    # the input is untouched
    assert list(pbmc.obs.columns) == list(before.obs.columns)
    assert (pbmc.layers["counts"] != before.layers["counts"]).nnz == 0
    loaded = load_model(model_dir, device="cpu")
    v = loaded.vocab
    assert loaded.meta["extra"]["global_step"] == 30
    assert loaded.meta["extra"]["vocabulary_sha256"] == v.sha256()
    assert len(v.genes) == 739  # every pbmc gene that maps to a human symbol (fewer than n_genes)
    assert sorted(v.categories["cell_type"]) == sorted(pbmc.obs["cell_type"].astype(str).unique())
    assert CellSentenceVocab.load(run / "vocabulary.json") == v
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run"]["tasks"] == {"annotate": 1.0, "generate": 1.0}
    metrics = pd.read_csv(run / "metrics.csv")
    for col in ("train/loss", "train/entity", "train/expression", "val/loss"):
        assert metrics[col].notna().any(), col
    # it decodes: annotation answers are cell-type tokens, generation emits genes then <E>
    labels = _annotate(loaded, pbmc, np.arange(8))
    assert set(labels) <= set(v.categories["cell_type"])
    tok = msfm.scmulan.tokenizer_for(loaded)
    ids, levels, mask = tok.left_pad(tok.prompts(None, meta=[{"cell_type": "CD19+ B"}], task="<SPToken1>"))
    allowed = id_mask([v.end_id, *v.gene_ids.tolist()], len(v))
    res = generate_tokens(loaded.model, ids, levels, mask, DecodeOptions(max_new_tokens=20), allowed=allowed)
    assert v.is_gene(res.ids[0][res.ids[0] > 0]).all()


class _Crash(RuntimeError):
    pass


class _CrashAt(lightning.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            raise _Crash


def test_resume_after_kill_equals_uninterrupted(small, tmp_path):
    cfg = _cfg(6, model_overrides={**TINY, "dropout": 0.1})  # dropout: the global RNG must resume too
    train(small, tmp_path / "a", cfg)
    with pytest.raises(_Crash):  # dies after step 5; the last checkpoint is from step 4
        train(small, tmp_path / "b", cfg, callbacks=[_CrashAt(5)])
    assert load_checkpoint(tmp_path / "b" / "model").meta["extra"]["global_step"] == 4
    train(small, tmp_path / "b", cfg)  # the same call again
    assert load_checkpoint(tmp_path / "b" / "model").meta["extra"]["global_step"] == 6
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5, msg=k)
    # a different seed gives different weights (the comparison above can fail)
    train(small, tmp_path / "c", cfg, seed=1)
    assert not torch.allclose(wa["token_embed.weight"], _weights(tmp_path / "c")["token_embed.weight"])


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory) -> Path:
    config, state = load_official_checkpoint(FIXTURE)
    model = ScMulan(config)
    model.load_state_dict(state, strict=True)
    return save_model(tmp_path_factory.mktemp("official") / "tiny", model, CellSentenceVocab.official())


def test_grow_model_keeps_old_rows(official_dir):
    loaded = load_model(official_dir, device="cpu")
    old = loaded.vocab
    new, added = extend_vocabulary(
        old, {"cell_type": ["T cell", "My new type"], "organ": ["Lung"], "donor": ["d1"]}
    )
    assert added == {"cell_type": ["My new type"], "donor": ["d1"]}  # existing tokens are not added again
    assert new.tokens[: len(old)] == old.tokens
    assert new.tokens[len(old) :] == ["My new type", "d1"]
    assert "My new type" in new.categories["cell_type"]
    grown = grow_model(loaded.model, old, new, seed=0)
    s_old, s_new = loaded.model.state_dict(), grown.state_dict()
    n = len(old)
    for key in s_old:
        if key in ("token_embed.weight", "entity_head.weight", "expression_head.weight"):
            assert torch.equal(s_new[key][:n], s_old[key]), key
            peers = old.category_ids("cell_type")
            torch.testing.assert_close(s_new[key][n], s_old[key][peers].mean(0))  # the category mean
            assert s_new[key].shape[0] == n + 2
        else:
            assert torch.equal(s_new[key], s_old[key]), key
    with pytest.raises(MsfmInputError, match="gene symbol"):
        extend_vocabulary(old, {"cell_type": ["CD3E"]})
    with pytest.raises(MsfmInputError, match="does not extend"):
        grow_model(grown, new, old)


def test_finetune_official_checkpoint_with_new_labels(small, official_dir, tmp_path):
    run = tmp_path / "ft"
    cfg = _cfg(3, model_overrides={}, max_genes=None)
    official = load_model(official_dir)
    before = {k: v.clone() for k, v in official.model.state_dict().items()}
    model_dir = train(small, run, cfg, checkpoint=official)
    # the loaded model handed in is not trained in place
    assert all(torch.equal(before[k], v) for k, v in official.model.state_dict().items())
    old = CellSentenceVocab.official()
    loaded = load_model(model_dir, device="cpu")
    v = loaded.vocab
    new_labels = sorted(set(small.obs["cell_type"].astype(str)) - set(old.tokens))
    assert len(v) == len(old) + len(new_labels)
    assert v.tokens[: len(old)] == old.tokens  # old ids unchanged
    assert sorted(v.tokens[len(old) :]) == new_labels
    assert loaded.config.vocab_size == len(v)
    assert (loaded.config.dim, loaded.config.depth) == (64, 2)
    assert loaded.meta["extra"]["vocabulary_added"]["cell_type"] == sorted(new_labels)
    assert loaded.meta["extra"]["global_step"] == 3
    assert set(_annotate(loaded, small, np.arange(4))) <= set(v.categories["cell_type"])
    # continuing the run (more steps) keeps its vocabulary and the record of what was added
    train(small, run, cfg, checkpoint=official_dir, max_steps=4)
    again = load_model(model_dir, device="cpu")
    assert again.vocab == v
    assert again.meta["extra"]["global_step"] == 4
    assert again.meta["extra"]["vocabulary_added"] == loaded.meta["extra"]["vocabulary_added"]


def test_next_state_pairing_rule():
    times = [0, 0, 1, 1, 2, np.nan, 0, 5, 1]
    groups = ["a", "a", "a", "b", "a", "a", "b", "b", None]
    partners = next_state_partners(times, groups)
    got = [p.tolist() for p in partners]
    # group a: 0 -> {2}, 1 -> {4}; group b: 0 -> {3}, 1 -> {7}, 5 is last; NaN time / missing group: none
    assert got == [[2], [2], [4], [7], [], [], [3], [], []]
    # without groups: times 0 -> all cells at 1; 1 -> at 2; 2 -> at 5
    got = [p.tolist() for p in next_state_partners(times)]
    assert got[0] == [2, 3, 8]
    assert got[2] == [4]
    assert got[4] == [7]
    assert got[7] == []


def test_train_next_state_only(small, tmp_path):
    data = small.copy()
    rng = np.random.default_rng(0)
    data.obs["day"] = rng.integers(0, 3, data.n_obs)
    data.obs["lineage"] = np.where(np.arange(data.n_obs) % 2, "x", "y")
    cfg = _cfg(3, tasks={"next_state": 1.0}, time_key="day", pair_key="lineage", max_genes=24)
    model_dir = train(data, tmp_path / "ns", cfg)
    loaded = load_model(model_dir, device="cpu")
    assert loaded.meta["extra"]["tasks"] == {"next_state": 1.0}
    assert "day" not in small.obs
    with pytest.raises(MsfmInputError, match="time_key"):
        train(data, tmp_path / "x", _cfg(1, tasks={"next_state": 1.0}))
    data.obs["day"] = "late"
    with pytest.raises(MsfmInputError, match="not numbers"):
        train(data, tmp_path / "y", cfg)


def test_stream_examples_are_deterministic(small, tmp_path, monkeypatch):
    from msfm.models.scmulan import training as tr

    data = small.copy()
    data.obs["day"] = np.arange(data.n_obs) % 3
    captured = {}

    class _Stop(Exception):
        pass

    def fake_fit(trainer, module, loader, out, **kw):
        captured["stream"] = loader.dataset
        raise _Stop

    cfg = _cfg(2, tasks={"annotate": 1.0, "generate": 1.0, "next_state": 1.0}, time_key="day", max_genes=16)
    monkeypatch.setattr(tr, "fit", fake_fit)
    with pytest.raises(_Stop):
        train(data, tmp_path / "run", cfg)
    stream = captured["stream"]
    b1, b2 = stream.batch(3), stream.batch(3)
    for k in b1:
        assert torch.equal(b1[k], b2[k]), k
    v = stream.sampler.vocab
    tasks = {ex.task for ex in stream.examples(range(60))}
    assert tasks == {"annotate", "generate", "next_state"}
    for ex in stream.examples(range(30)):
        words = v.decode(ex.ids)
        if ex.task == "next_state":
            assert words[ex.prefix_len - 1] == "<SPToken2>"
            assert v.is_gene(ex.ids[: ex.prefix_len - 1]).all()
        assert words[-1] == "<E>"
    # micro-batch m of rank r in a world of w holds examples (m * w + r) * batch_size + i
    ex = stream.examples([(2 * 2 + 1) * stream.batch_size])[0]
    assert torch.equal(stream.batch(2, rank=1, world=2)["ids"][0, : len(ex)], torch.from_numpy(ex.ids))


def test_max_epochs_becomes_steps_with_validation(small, tmp_path):
    cfg = _cfg(-1, max_epochs=2, accumulate=2, val_fraction=0.2, checkpoint_every_n_steps=3)
    run = tmp_path / "ep"
    model_dir = train(small[:50].copy(), run, cfg)
    # 10 of 50 cells held out; 40 training cells / (4 per batch x 1 device x 2 accumulated) = 5 steps per epoch
    assert load_checkpoint(model_dir).meta["extra"]["global_step"] == 10
    assert load_checkpoint(model_dir).meta["extra"]["n_val_cells"] == 10
    assert pd.read_csv(run / "metrics.csv")["val/loss"].notna().sum() >= 3


def test_bad_inputs(small, tmp_path):
    with pytest.raises(MsfmInputError, match=r"'celltype'.*obs columns: \['cell_type'"):
        train(small, tmp_path / "a", _cfg(1, meta_columns={"cell_type": "celltype"}))
    zero = small[:20].copy()
    zero.layers["counts"] = sp.csr_matrix(zero.shape, dtype=np.float32)
    zero.X = zero.layers["counts"].copy()
    with pytest.raises(MsfmInputError, match="No usable cells"):
        train(zero, tmp_path / "b", _cfg(1))
    unknown = small[:20].copy()
    unknown.obs["cell_type"] = "Unclassified"
    with pytest.raises(MsfmInputError, match=r"'annotate'.*no cell has a known label"):
        train(unknown, tmp_path / "c", _cfg(1, tasks={"annotate": 1.0}))
    with pytest.raises(MsfmInputError, match=r"'organ_region'.*neither 'organ' nor 'region'"):
        train(small, tmp_path / "d", _cfg(1, tasks={"organ_region": 1.0}))
    with pytest.raises(MsfmInputError, match="No training data"):
        train([], tmp_path / "e", _cfg(1))
    with pytest.raises(MsfmInputError, match="Unknown ScMulanTrainConfig setting 'nope'"):
        train(small, tmp_path / "g", _cfg(1), nope=1)
    with pytest.raises(MsfmInputError, match="Unknown task"):
        train(small, tmp_path / "g", _cfg(1), tasks="annotate=1,fly=2")
    assert not (tmp_path / "g").exists()  # settings are checked before anything is written
    with pytest.raises(MsfmInputError, match="neither 'data', 'official'"):
        train(small, tmp_path / "f", _cfg(1, vocabulary="missing.json"))


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text(
        "preset: scmulan-tiny\nbatch_size: 3\nmeta_columns: {cell_type: ct, organ: tissue}\n"
        "tasks: {annotate: 2, organ_region: 1}\ntrainer:\n  max_steps: 2\n  seed: 7\nloss:\n  targets: next\n"
    )
    cfg = ScMulanTrainConfig.from_file(f)
    assert cfg.batch_size == 3
    assert cfg.trainer.max_steps == 2
    assert cfg.seed == 7  # a trainer seed given alone becomes the run's seed
    assert cfg.loss.targets == "next"
    cfg2 = build_settings(
        ScMulanTrainConfig,
        base=cfg,
        overrides={
            "lr": 1e-3,
            "devices": "2",
            "tasks": "annotate=1,generate=0.5",
            "meta_columns": "cell_type=x",
            "seed": 3,
        },
    )
    assert cfg2.optim.lr == 1e-3
    assert cfg2.trainer.devices == 2
    assert cfg2.tasks == {"annotate": 1.0, "generate": 0.5}
    assert cfg2.meta_columns == {"cell_type": "x"}
    assert cfg2.seed == cfg2.trainer.seed == 3
    assert cfg2.optim.betas == (0.9, 0.95)


@pytest.mark.slow  # 23 s in the full run (two spawned processes)
@pytest.mark.distributed
def test_train_two_process_ddp_cpu(small, tmp_path):
    """2-process CPU DDP (gloo): both ranks train on different examples, the run exports one model."""
    path = tmp_path / "small.h5ad"
    small.write_h5ad(path)
    script = tmp_path / "ddp.py"
    script.write_text(
        "import sys, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "import msfm\n"
        "msfm.scmulan.train([sys.argv[1]], sys.argv[2], max_steps=3, batch_size=2, accelerator='cpu',\n"
        "    devices=2, strategy='ddp', checkpoint_every_n_steps=3, warmup_steps=1, max_genes=32,\n"
        "    n_genes=200, model_overrides={'dim': 32, 'depth': 1, 'num_heads': 2}, progress_bar=False)\n"
    )
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    src = str(Path(msfm.__file__).parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(script), str(path), str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_checkpoint(tmp_path / "run" / "model").meta["extra"]["global_step"] == 3
    assert load_model(tmp_path / "run" / "model", device="cpu").config.vocab_size > 200
