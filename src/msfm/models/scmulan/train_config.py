"""``ScMulanTrainConfig``: every setting of a scMulan training run (written to ``RUN_DIR/config.json``).

Build it with :func:`msfm.runtime.config.build_settings` (``msfm.scmulan.train`` does): flat keys land in their
section (``lr`` -> ``optim.lr``, ``devices`` -> ``trainer.devices``, ``expression_weight`` ->
``loss.expression_weight``), a YAML/JSON file gives nested sections as mappings.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from msfm.engine.module import OptimConfig
from msfm.engine.trainer import TrainerOptions
from msfm.models.scmulan.objective import TASKS, ScMulanLossConfig
from msfm.runtime.config import build_settings

__all__ = ["FINETUNE_OVERRIDES", "ScMulanTrainConfig"]

#: Model fields a fine-tuning run may change without changing any weight shape.
FINETUNE_OVERRIDES = {"dropout", "max_length"}


class ScMulanTrainConfig(BaseModel):
    """Everything a scMulan training run needs; written to ``RUN_DIR/config.json``.

    The checkpoint to fine-tune is not a setting: it is the ``checkpoint=`` argument of ``msfm.scmulan.train``
    (CLI ``-c/--checkpoint``).
    """

    model_config = ConfigDict(extra="forbid")

    preset: str = Field("scmulan-tiny", description="Model preset for a new model (msfm.registry).")
    model_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Fields replacing the preset's; when fine-tuning only 'dropout' and 'max_length'.",
    )
    meta_columns: dict[str, str] = Field(
        default_factory=lambda: {"cell_type": "cell_type"},
        description=(
            "Vocabulary category -> obs column, e.g. {'cell_type': 'cell_type', 'coarse_cell_type': 'lineage', "
            "'organ': 'tissue'} (or 'cell_type=cell_type,organ=tissue'). Task answers use 'cell_type' (fine), "
            "'coarse_cell_type', 'organ', 'region'."
        ),
    )
    tasks: dict[str, float] = Field(
        default_factory=lambda: {"annotate": 1.0, "generate": 1.0},
        description=(
            "Task weights among annotate, organ_region, generate, next_state (renormalised per cell); "
            "also 'annotate=1,generate=0.5'."
        ),
    )
    time_key: str | None = Field(None, description="obs column with the time of each cell (next_state).")
    pair_key: str | None = Field(
        None, description="obs column grouping cells that may pair for next_state (None: all cells)."
    )
    vocabulary: str = Field(
        "data",
        description=(
            "'data': genes of the data (harmonised human symbols; the top n_genes highly variable ones) and the "
            "metadata values; 'official': the released 2,222-token vocabulary (grown with new values); or the "
            "path of a vocabulary JSON (CellSentenceVocab.save). Ignored when fine-tuning a checkpoint."
        ),
    )
    n_genes: int | None = Field(2000, ge=1, description="'data' vocabulary: keep this many HVGs (None: all).")
    hvg_max_cells: int = Field(50_000, ge=10, description="Cells sampled to rank highly variable genes.")
    max_genes: int | None = Field(None, ge=1, description="Keep only the top-expressed genes of a cell.")
    gene_order: Literal["random", "reverse", "forward"] = Field(
        "random", description="Gene order in training sentences ('random': fresh permutation per example)."
    )
    meta_prompt_prob: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="annotate/organ_region: chance of other metadata words in the prompt.",
    )
    unknown_values: list[str] = Field(
        default_factory=lambda: ["Unclassified", "unknown", "Unknown", "nan", "NaN", "None", "NA", ""],
        description="obs values treated as missing (besides NaN/None).",
    )
    loss: ScMulanLossConfig = Field(default_factory=ScMulanLossConfig)
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(
            lr=3e-4,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            warmup_steps=100,
            schedule="cosine",
            min_lr_ratio=0.1,
        ),
        description="AdamW (decay on 2-d weights) with warm-up and cosine decay.",
    )
    trainer: TrainerOptions = Field(default_factory=lambda: TrainerOptions(max_steps=1000, gradient_clip=1.0))
    batch_size: int = Field(16, ge=1, description="Sentences per device per micro-step.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (in-memory data: keep 0).")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of cells held out for validation.")
    layer: str | None = Field(None, description="Matrix to read (default: layers['counts'] else X).")
    pre_normalized: bool = Field(False, description="The matrix already holds log1p-normalised values.")
    gene_column: str | None = Field(None, description="var column with symbols/Ensembl IDs.")
    species: Literal["human", "mouse"] = Field("human", description="mouse genes are mapped via orthologs.")
    use_aliases: bool = Field(True, description="Map previous/alias symbols.")
    seed: int = Field(0, description="Seeds everything: examples, split, HVG sample, init, trainer.")

    @model_validator(mode="before")
    @classmethod
    def _no_init_from(cls, data: Any) -> Any:
        if isinstance(data, dict) and "init_from" in data:
            msg = (
                "init_from is no longer a setting: pass the checkpoint to fine-tune as "
                "msfm.scmulan.train(data, out, checkpoint=...) (CLI: -c/--checkpoint)."
            )
            raise ValueError(msg)
        return data

    @field_validator("meta_columns", mode="before")
    @classmethod
    def _parse_meta(cls, value: Any) -> Any:
        return _parse_pairs(value, "meta_columns") if isinstance(value, str) else value

    @field_validator("tasks", mode="before")
    @classmethod
    def _parse_tasks(cls, value: Any) -> Any:
        return _parse_pairs(value, "tasks") if isinstance(value, str) else value

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(TASKS))
        if unknown:
            msg = f"Unknown task(s) {unknown}; expected names among {sorted(TASKS)}."
            raise ValueError(msg)
        if any(v < 0 for v in value.values()) or not any(v > 0 for v in value.values()):
            msg = f"Task weights must be >= 0 with at least one > 0; got {value}."
            raise ValueError(msg)
        return value

    @field_validator("meta_columns")
    @classmethod
    def _check_meta(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k, v in value.items() if not k or not isinstance(v, str) or not v]
        if bad:
            msg = f"meta_columns needs non-empty category names and obs column names; bad entries: {bad}."
            raise ValueError(msg)
        return value

    @model_validator(mode="after")
    def _sync_seed(self) -> ScMulanTrainConfig:
        # One seed: a trainer seed given alone (e.g. in an old YAML) wins, otherwise `seed` is copied into it.
        if "seed" not in self.model_fields_set and self.trainer.seed != 0:
            self.seed = self.trainer.seed
        if self.trainer.seed != self.seed:
            self.trainer = self.trainer.model_copy(update={"seed": self.seed})
        return self

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ScMulanTrainConfig:
        """Read a YAML or JSON file with these fields (nested sections as mappings)."""
        return build_settings(cls, file=path)


def _parse_pairs(text: str, key: str) -> dict[str, str]:
    """``"a=b,c=d"`` -> ``{"a": "b", "c": "d"}`` (values are validated by the field's type)."""
    out: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "=" not in part:
            msg = (
                f"{key}={text!r}: expected 'name=value' pairs separated by commas, e.g. 'cell_type=celltype'."
            )
            raise ValueError(msg)
        name, value = (s.strip() for s in part.split("=", 1))
        out[name] = value
    return out
