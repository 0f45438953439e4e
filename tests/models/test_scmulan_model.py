"""scMulan network: official parity, strict layouts, padding/batching invariance, KV cache, decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from msfm.errors import CheckpointError, MsfmInputError
from msfm.models.scmulan.config import ScMulanConfig
from msfm.models.scmulan.decoding import DecodeOptions, generate_tokens, id_mask
from msfm.models.scmulan.model import ScMulan
from msfm.models.scmulan.official import (
    config_to_official,
    convert_official_state_dict,
    load_official_checkpoint,
    official_key_table,
    to_official_state_dict,
)
from msfm.registry import preset_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "scmulan"
CKPT = FIXTURES / "tiny_official.pt"
IO = FIXTURES / "tiny_official_io.safetensors"
ATOL = 1e-4


@pytest.fixture(scope="module")
def official() -> ScMulan:
    config, state = load_official_checkpoint(CKPT)
    model = ScMulan(config).eval()
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(IO)


def _left_padded(
    io: dict[str, torch.Tensor], task: str, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lengths = io[f"{task}.prompt_len"] if f"{task}.prompt_len" in io else io["annot.prompt_len"]
    levels_key = f"{task}.prompt_levels" if f"{task}.prompt_levels" in io else "annot.prompt_levels"
    t = int(lengths[:n].max())
    ids = torch.zeros(n, t, dtype=torch.long)
    levels = torch.zeros_like(ids)
    mask = torch.zeros(n, t, dtype=torch.bool)
    for i in range(n):
        p = int(lengths[i])
        ids[i, t - p :] = io[f"{task}.prompt_ids"][i, :p]
        levels[i, t - p :] = io[levels_key][i, :p]
        mask[i, t - p :] = True
    return ids, levels, mask


def _tiny(seed: int = 0, **overrides: object) -> ScMulan:
    torch.manual_seed(seed)
    return ScMulan(preset_config("scmulan-tiny", dim=32, depth=2, num_heads=2, **overrides)).eval()


# ----------------------------------------------------------------------------------------------------------
# official parity
# ----------------------------------------------------------------------------------------------------------
def test_config_read_from_official_model_args(official: ScMulan) -> None:
    c = official.config
    assert (c.vocab_size, c.dim, c.depth, c.num_heads, c.n_levels) == (2222, 64, 2, 4, 10)
    assert official.num_parameters() == 525_952


def test_forward_matches_official(official: ScMulan, io: dict[str, torch.Tensor]) -> None:
    for i in range(6):
        p = int(io["annot.prompt_len"][i])
        ids = io["annot.prompt_ids"][i, :p][None]
        levels = io["annot.prompt_levels"][i, :p][None]
        with torch.no_grad():
            out = official(ids, levels, heads="last")
        torch.testing.assert_close(out.logits[0, 0], io["annot.fwd.logits_cls_last"][i], atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(
            out.expression[0, 0], io["annot.fwd.logits_exp_last"][i], atol=ATOL, rtol=ATOL
        )
        torch.testing.assert_close(out.hidden[0], io["annot.fwd.hidden"][i, :p], atol=ATOL, rtol=ATOL)
    ids, levels, mask = _left_padded(io, "cg", 2)
    with torch.no_grad():
        out = official(ids, levels, attention_mask=mask, heads="last")
    torch.testing.assert_close(out.logits[:, 0], io["cg.fwd.logits_cls_last"], atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(out.expression[:, 0], io["cg.fwd.logits_exp_last"], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize(("variant", "repeat_mask"), [("nonkv", "official"), ("kv", "all")])
@pytest.mark.parametrize(("task", "n", "steps"), [("annot", 6, 3), ("organ", 6, 2), ("cg", 2, 30)])
def test_greedy_decoding_matches_official(
    official: ScMulan,
    io: dict[str, torch.Tensor],
    task: str,
    n: int,
    steps: int,
    variant: str,
    repeat_mask: str,
    use_cache: bool,
) -> None:
    ids, levels, mask = _left_padded(io, task, n)
    result = generate_tokens(
        official,
        ids,
        levels,
        mask,
        DecodeOptions(max_new_tokens=steps, repeat_mask=repeat_mask),
        use_cache=use_cache,
    )
    expected_ids = io[f"{task}.gen.{variant}.ids"]
    expected_levels = io[f"{task}.gen.{variant}.levels"]
    width = expected_ids.shape[1]
    valid = expected_ids >= 0
    assert torch.equal(result.n_new, io[f"{task}.gen.{variant}.n_new"])
    assert torch.equal(result.ids[:, :width][valid], expected_ids[valid])
    assert torch.equal(result.levels[:, :width][valid], expected_levels[valid])
    raw = io[f"{task}.gen.{variant}.level_raw"]
    torch.testing.assert_close(result.level_raw[:, :width][valid], raw[valid], atol=ATOL, rtol=ATOL)
    # Nothing is reported after a sentence stopped.
    for row, count in enumerate(result.n_new.tolist()):
        assert (result.ids[row, count:] == -1).all()


def test_integration_embedding_matches_official(official: ScMulan, io: dict[str, torch.Tensor]) -> None:
    ids, levels, mask = _left_padded(io, "annot", 6)
    result = generate_tokens(
        official, ids, levels, mask, DecodeOptions(max_new_tokens=3, repeat_mask="official")
    )
    torch.testing.assert_close(result.hidden[:, 0], io["annot.embedding"], atol=ATOL, rtol=ATOL)


# ----------------------------------------------------------------------------------------------------------
# layouts and conversion
# ----------------------------------------------------------------------------------------------------------
def test_strict_load_of_the_released_368m_layout() -> None:
    layout = json.loads((FIXTURES / "official_368m_layout.json").read_text())
    args = layout["model_args_used"]
    with torch.device("meta"):
        state = {k: torch.empty(shape) for k, shape in layout["state_dict"].items()}
    from msfm.models.scmulan.official import config_from_official

    config = config_from_official(args)
    assert config == preset_config("scmulan-368m", max_length=config.max_length)
    converted = convert_official_state_dict(state, config)
    with torch.device("meta"):
        model = ScMulan(config)
    model.load_state_dict(converted, strict=True, assign=True)
    assert model.num_parameters() == layout["num_parameters"] == 368_800_320
    assert len(converted) == layout["num_tensors"] == 149


def test_key_table_and_inverse_round_trip(official: ScMulan) -> None:
    ckpt = torch.load(CKPT, weights_only=True)
    back = to_official_state_dict(official.state_dict(), official.config)
    assert set(back) == set(ckpt["model"])
    for key, value in ckpt["model"].items():
        assert torch.equal(back[key], value)
    assert set(official_key_table(2).values()) == set(official.state_dict())
    args = config_to_official(official.config)
    assert args["n_layer"] == 2
    assert args["n_embd"] == 64
    assert args["bias"] is False


def test_convert_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "not_a_dict.pt"
    torch.save([1, 2, 3], bad)
    with pytest.raises(CheckpointError, match="'model' and 'model_args'"):
        load_official_checkpoint(bad)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_official_checkpoint(garbage)
    ckpt = torch.load(CKPT, weights_only=True)
    ckpt["model_args"] = {**ckpt["model_args"], "bias": True}
    torch.save(ckpt, tmp_path / "bias.pt")
    with pytest.raises(CheckpointError, match="bias"):
        load_official_checkpoint(tmp_path / "bias.pt")
    ckpt = torch.load(CKPT, weights_only=True)
    del ckpt["model"]["lm_head.weight"]
    ckpt["model"]["transformer.extra.weight"] = torch.zeros(1)
    torch.save(ckpt, tmp_path / "keys.pt")
    with pytest.raises(CheckpointError, match=r"missing keys.*entity_head|transformer.extra"):
        load_official_checkpoint(tmp_path / "keys.pt")


def test_unknown_args_are_ignored_and_prefixes_stripped(tmp_path: Path, official: ScMulan) -> None:
    ckpt = torch.load(CKPT, weights_only=True)
    ckpt["model_args"]["beta"] = 200  # some internal checkpoints carry it
    ckpt["model"] = {f"module.{k}": v for k, v in ckpt["model"].items()}
    ckpt["optimizer"] = {"state": {}}
    torch.save(ckpt, tmp_path / "ddp.pt")
    config, state = load_official_checkpoint(tmp_path / "ddp.pt")
    assert config == official.config
    for key, value in official.state_dict().items():
        assert torch.equal(state[key], value)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ScMulanConfig(dim=30, num_heads=4)
    with pytest.raises(MsfmInputError, match="Unknown model 'scmulan-huge'"):
        preset_config("scmulan-huge")


# ----------------------------------------------------------------------------------------------------------
# invariances
# ----------------------------------------------------------------------------------------------------------
def _random_sentences(n: int, seed: int, vocab: int = 2222) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(2, 20, (1,), generator=g))
        ids = torch.randint(1, vocab, (length,), generator=g)
        levels = torch.randint(0, 11, (length,), generator=g)
        out.append((ids, levels))
    return out


def _pad_left(
    sentences: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = max(len(s[0]) for s in sentences)
    ids = torch.zeros(len(sentences), t, dtype=torch.long)
    levels = torch.zeros_like(ids)
    mask = torch.zeros(len(sentences), t, dtype=torch.bool)
    for i, (a, b) in enumerate(sentences):
        ids[i, t - len(a) :], levels[i, t - len(a) :], mask[i, t - len(a) :] = a, b, True
    return ids, levels, mask


def test_shapes_and_heads() -> None:
    model = _tiny()
    ids = torch.randint(0, 2222, (3, 7))
    levels = torch.randint(0, 11, (3, 7))
    out = model(ids, levels)
    assert out.logits.shape == (3, 7, 2222)
    assert out.expression.shape == (3, 7, 2222)
    assert out.hidden.shape == (3, 7, 32)
    assert model(ids, levels, heads="last").logits.shape == (3, 1, 2222)
    assert model(ids, levels, heads="none").logits is None
    with pytest.raises(ValueError, match="same shape"):
        model(ids, levels[:, :3])


def test_left_padded_batch_equals_one_by_one() -> None:
    model = _tiny(1)
    sentences = _random_sentences(5, seed=3)
    ids, levels, mask = _pad_left(sentences)
    with torch.no_grad():
        batched = model(ids, levels, attention_mask=mask)
        for i, (a, b) in enumerate(sentences):
            single = model(a[None], b[None])
            n = len(a)
            torch.testing.assert_close(batched.hidden[i, -n:], single.hidden[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched.logits[i, -n:], single.logits[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_equals_full_forward() -> None:
    model = _tiny(2)
    sentences = _random_sentences(4, seed=4)
    ids, levels, mask = _pad_left(sentences)
    with torch.no_grad():
        full = model(ids, levels, attention_mask=mask)
        cache = model.new_cache()
        split = ids.shape[1] - 3
        first = model(ids[:, :split], levels[:, :split], attention_mask=mask[:, :split], cache=cache)
        hidden = [first.hidden]
        for t in range(split, ids.shape[1]):
            step = model(
                ids[:, t : t + 1], levels[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache
            )
            hidden.append(step.hidden)
    torch.testing.assert_close(torch.cat(hidden, 1)[mask], full.hidden[mask], atol=1e-5, rtol=1e-5)


def test_batched_decoding_equals_one_by_one_and_cache_equals_no_cache(official: ScMulan) -> None:
    sentences = _random_sentences(4, seed=5)
    ids, levels, mask = _pad_left(sentences)
    options = DecodeOptions(max_new_tokens=6, repeat_mask="all")
    batched = generate_tokens(official, ids, levels, mask, options)
    uncached = generate_tokens(official, ids, levels, mask, options, use_cache=False)
    assert torch.equal(batched.ids, uncached.ids)
    assert torch.equal(batched.levels, uncached.levels)
    for i, (a, b) in enumerate(sentences):
        single = generate_tokens(official, a[None], b[None], None, options)
        n = int(single.n_new[0])
        assert torch.equal(single.ids[0, :n], batched.ids[i, :n])
        assert torch.equal(single.levels[0, :n], batched.levels[i, :n])
        torch.testing.assert_close(single.prob[0, :n], batched.prob[i, :n], atol=1e-5, rtol=1e-5)


def test_sampling_is_seeded_and_cache_independent(official: ScMulan) -> None:
    ids, levels, mask = _pad_left(_random_sentences(3, seed=6))
    options = DecodeOptions(max_new_tokens=8, greedy=False, temperature=1.3, top_k=50, end_weight=0.1)
    runs = [
        generate_tokens(
            official, ids, levels, mask, options, generator=torch.Generator().manual_seed(7), use_cache=c
        )
        for c in (True, False, True)
    ]
    assert torch.equal(runs[0].ids, runs[1].ids)
    assert torch.equal(runs[0].ids, runs[2].ids)
    other = generate_tokens(official, ids, levels, mask, options, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0].ids, other.ids)


def test_constrained_decoding_and_end_weight(official: ScMulan) -> None:
    ids, levels, mask = _pad_left(_random_sentences(4, seed=9))
    allowed = [id_mask(range(2008, 2122), 2222), id_mask(range(2001, 2008), 2222)]
    result = generate_tokens(official, ids, levels, mask, DecodeOptions(max_new_tokens=3), allowed=allowed)
    assert ((result.ids[:, 0] >= 2008) & (result.ids[:, 0] < 2122)).all()
    # The last entry repeats: steps 1 and 2 are organs, and repeats are banned.
    assert ((result.ids[:, 1:] >= 2001) & (result.ids[:, 1:] < 2008)).all()
    assert (result.ids[:, 1] != result.ids[:, 2]).all()
    # Only <E> allowed and end_weight 0: nothing is left to choose, the sentence ends at once.
    only_end = generate_tokens(
        official,
        ids,
        levels,
        mask,
        DecodeOptions(max_new_tokens=3, end_weight=0.0),
        allowed=id_mask([0], 2222),
    )
    assert (only_end.ids[:, 0] == 0).all()
    assert (only_end.n_new == 1).all()


def test_decode_options_and_input_errors(official: ScMulan) -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        DecodeOptions(max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        DecodeOptions(max_new_tokens=1, temperature=0)
    ids = torch.tensor([[5, 6, 0]])
    with pytest.raises(ValueError, match="left padded"):
        generate_tokens(
            official, ids, ids, torch.tensor([[True, True, False]]), DecodeOptions(max_new_tokens=1)
        )
    with pytest.raises(ValueError, match="max_length"):
        generate_tokens(official, ids, ids, None, DecodeOptions(max_new_tokens=5000))


def test_generated_repeat_mask_allows_prompt_words_but_not_repeats(
    official: ScMulan, io: dict[str, torch.Tensor]
) -> None:
    # Gene-only prompts (the annotation prompts without <PCT>); this fixture model likes repeating its last word.
    sentences = [
        (
            io["annot.prompt_ids"][i, : int(io["annot.prompt_len"][i]) - 1],
            io["annot.prompt_levels"][i, : int(io["annot.prompt_len"][i]) - 1],
        )
        for i in range(3)
    ]
    ids, levels, mask = _pad_left(sentences)
    # Allow only the prompt's own genes: "all" bans them (the sentence ends at once), "generated" does not.
    allowed = torch.zeros(3, 2222, dtype=torch.bool)
    for row in range(3):
        allowed[row, ids[row][mask[row]]] = True
    options = {"max_new_tokens": 8, "end_weight": 0.0}
    result = generate_tokens(
        official, ids, levels, mask, DecodeOptions(repeat_mask="generated", **options), allowed=allowed
    )
    banned_all = generate_tokens(
        official, ids, levels, mask, DecodeOptions(repeat_mask="all", **options), allowed=allowed
    )
    assert (banned_all.ids[:, 0] == 0).all()
    assert (result.n_new == 8).all()
    for row in range(3):
        new = result.ids[row].tolist()
        assert len(new) == len(set(new))  # no generated word twice
        assert set(new) <= set(ids[row][mask[row]].tolist())
