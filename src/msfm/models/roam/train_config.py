"""Settings of a ROAM training run (:class:`RoamTrainConfig`, stored in ``RUN/run.json``).

Build them with ``msfm.runtime.config.build_settings`` (``msfm.roam.train`` does: a settings object, a mapping or a
YAML/JSON file, plus flat overrides such as ``lr=`` or ``devices="0,1"``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from msfm.models.roam.tables import SLIDE_ID, parse_label_map
from msfm.runtime.devices import parse_devices

__all__ = ["RUNTIME_FIELDS", "RoamTrainConfig"]

#: Settings that may change between a run and its resumption (hardware, speed, verbosity).
RUNTIME_FIELDS = frozenset(
    {
        "accelerator",
        "devices",
        "strategy",
        "num_nodes",
        "precision",
        "num_workers",
        "progress_bar",
        "cache_gb",
        "roi_chunk",
        "skip_missing",
        "checkpoint_every_n_epochs",
    }
)


class RoamTrainConfig(BaseModel):
    """Every setting of a ROAM training run (stored in ``RUN/run.json``); defaults follow the released code.

    Epochs are counted from 0 (the first epoch is epoch 0).
    """

    model_config = ConfigDict(extra="forbid")

    task: str = Field(..., min_length=1, description="Column of the slide table holding the labels.")
    classes: list[str] | None = Field(
        None,
        description="Class names in logit order (default: sorted label values; numbers sort numerically).",
    )
    label_map: dict[str, str] | None = Field(
        None,
        description=(
            "Raw table value -> class name (e.g. {'2': 'tumour', '3': 'tumour'}); values not in the map are left "
            "out of the task."
        ),
    )
    slide_column: str = Field(SLIDE_ID, description="Column with the slide ids (feature file <id>.h5).")
    group_column: str | None = Field(
        "auto",
        description=(
            "Patient column for grouped splits: 'auto' uses the first of case_id/patient_id/patient/case that "
            "exists, None disables grouping."
        ),
    )
    model: str = Field(
        "roam-subtyping",
        description="Model preset (msfm.registry), e.g. roam-tiny; train(preset=...) and CLI --preset set it.",
    )
    model_overrides: dict[str, Any] = Field(default_factory=dict, description="RoamConfig fields to change.")
    init_from: str | None = Field(
        None,
        description=(
            "Start from this msfm ROAM checkpoint (heads whose shape differs are re-initialised); train's "
            "checkpoint= argument (CLI -c) sets it."
        ),
    )
    folds: int = Field(5, ge=2, description="Cross-validation folds.")
    test_frac: float = Field(
        0.0, ge=0.0, lt=0.9, description="Fraction of slides (patients) held out for test."
    )
    seed: int = Field(1, ge=0, description="Seeds splits, model init, sampling, ROI dropout and dropout.")
    batch_size: int = Field(4, ge=1, description="Slides per optimiser step (the loss is their mean).")
    roi_weight: float = Field(1.0, ge=0.0, description="Weight of the top-k instance loss.")
    roi_keep_fraction: float = Field(0.8, gt=0.0, le=1.0, description="ROI dropout: fraction of ROIs kept.")
    roi_dropout_min: int = Field(
        16, ge=1, description="ROI dropout applies to slides with at least this many ROIs."
    )
    max_train_rois: int | None = Field(
        None, ge=1, description="Cap on ROIs per training slide (random subset)."
    )
    balanced_sampling: bool = Field(
        True, description="Class-balanced sampling with replacement (N / N_class)."
    )
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    warmup_epochs: int = Field(5, ge=0, description="Linear learning-rate warm-up, then constant.")
    max_epochs: int = Field(200, ge=1)
    best_from_epoch: int = Field(
        5, ge=0, description="Only epochs >= this are candidates for the best model."
    )
    early_stopping: bool = True
    patience: int = Field(
        20, ge=0, description="Stop when more than this many epochs pass without improvement ..."
    )
    stop_epoch: int = Field(20, ge=0, description="... and the epoch is at least this.")
    gradient_clip: float | None = Field(
        None, gt=0.0, description="Gradient-norm clip (the release uses none)."
    )
    accelerator: str = "auto"
    devices: Literal["auto"] | int | list[int] = "auto"
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    precision: str = "32-true"
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes reading feature files.")
    cache_gb: float = Field(
        4.0, ge=0.0, description="Keep slide features in memory up to this many GiB (per DataLoader worker)."
    )
    roi_chunk: int | None = Field(
        None,
        ge=1,
        description="Encode at most this many ROIs at once when predicting (None: 64, the fastest measured).",
    )
    checkpoint_every_n_epochs: int = Field(
        1, ge=1, description="How often last.ckpt is written (resume point)."
    )
    progress_bar: bool = True
    skip_missing: bool = Field(
        False, description="Leave out slides without a feature file instead of failing."
    )

    @field_validator("classes", mode="before")
    @classmethod
    def _split_classes(cls, value: Any) -> Any:
        # "astro,oligo" (command line) -> ["astro", "oligo"]
        return [c.strip() for c in value.split(",") if c.strip()] if isinstance(value, str) else value

    @field_validator("label_map", mode="before")
    @classmethod
    def _parse_label_map(cls, value: Any) -> Any:
        # "2=tumour,3=tumour" (command line) -> {"2": "tumour", "3": "tumour"}
        return parse_label_map(value) if isinstance(value, str) else value

    @field_validator("group_column", mode="before")
    @classmethod
    def _no_group(cls, value: Any) -> Any:
        # "none" (command line) disables grouping like None
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @field_validator("devices", mode="before")
    @classmethod
    def _parse_devices(cls, value: Any) -> Any:
        return parse_devices(value)

    @field_validator("classes")
    @classmethod
    def _check_classes(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (len(value) < 2 or len(set(value)) != len(value)):
            msg = f"classes must list at least two distinct names; got {value}."
            raise ValueError(msg)
        return value

    def fingerprint(self) -> dict[str, Any]:
        """The settings that define the run (everything but hardware and speed options)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in RUNTIME_FIELDS}
