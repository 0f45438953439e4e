"""Settings of slide preprocessing (:class:`PreprocessConfig`) and the signature that makes a feature file "done"."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from msfm.errors import MsfmInputError
from msfm.models.roam.encoders import PatchEncoder, build_encoder, encoder_signature

__all__ = ["PIPELINE_VERSION", "PreprocessConfig", "run_signature"]

# Bump when the per-slide pipeline changes its output, so old files are no longer "done" on resume.
PIPELINE_VERSION = 1
# Fields of PreprocessConfig that change the features (the rest only change speed or side outputs).
_FEATURE_FIELDS = (
    "target_mpp",
    "roi_size",
    "patch_size",
    "step",
    "tissue_preset",
    "tissue_overrides",
    "min_tissue",
    "seg_mpp",
    "thumbnail_size",
    "skip_background",
    "background_std",
    "stain_norm",
    "mpp",
)


class PreprocessConfig(BaseModel):
    """Settings of ``msfm.roam.preprocess`` (frozen; stored in every feature file and in
    ``out/preprocess_config.json``).

    ROAM reads 84 tokens per ROI (8x8 + 4x4 + 2x2 patches), so ``roi_size`` must be ``8 * patch_size``:
    2048/256 (the ROAM setting), or smaller pairs such as 512/64 for quick tests. Give one of the two and the
    other follows.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            # One MsfmInputError that names each bad field, instead of pydantic's multi-line report.
            parts = []
            for e in err.errors():
                text = str(e["msg"]).removeprefix("Value error, ")
                where = ".".join(str(x) for x in e["loc"])
                parts.append(f"{where}: {text} (got {e.get('input')!r})" if where else text)
            problems = "; ".join(parts)
            msg = f"Invalid preprocessing settings: {problems}"
            raise MsfmInputError(msg) from None

    target_mpp: float = Field(0.5, gt=0, description="microns per pixel of the ROIs (0.5 = 20x)")
    roi_size: int = Field(2048, ge=8, description="ROI side in pixels at target_mpp")
    patch_size: int = Field(256, ge=1, description="patch side in pixels (roi_size / 8)")
    step: int | None = Field(None, ge=1, description="ROI step at target_mpp (default roi_size: no overlap)")
    tissue_preset: str = Field("default", description="msfm.data.tissue.TISSUE_PRESETS name")
    tissue_overrides: dict[str, Any] = Field(
        default_factory=dict, description="TissueParams fields to change"
    )
    min_tissue: float = Field(0.1, ge=0, le=1, description="smallest tissue fraction of a kept ROI")
    seg_mpp: float = Field(
        8.0, gt=0, description="microns per pixel of the segmentation thumbnail (CLAM ~16)"
    )
    thumbnail_size: int = Field(2048, ge=64, description="largest side of the segmentation thumbnail")
    skip_background: bool = Field(True, description="drop ROIs whose red-channel std is below background_std")
    background_std: float = Field(5.0, ge=0)
    stain_norm: Literal["none", "macenko", "reinhard"] = "none"
    stain_target: str | None = Field(None, description="stain target image (default: the bundled one)")
    encoder: str = Field("resnet50_trunc", description="msfm.models.roam.encoders name")
    weights: str | None = Field(None, description="local encoder weights file")
    encoder_options: dict[str, Any] = Field(default_factory=dict, description="encoder builder options")
    mpp: float | None = Field(None, gt=0, description="mpp override for every slide (slides without mpp)")
    backend: str = Field("auto", description="slide reader backend: auto | openslide | tiffslide | image")
    batch_size: int = Field(256, ge=1, description="patches per encoder batch (rounded to whole ROIs)")
    cpu_chunk: int | None = Field(
        None, ge=1, description="patches per forward on the CPU (default: the encoder's cache-friendly size)"
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    workers: int = Field(1, ge=1, description="slides processed in parallel (processes)")
    read_threads: int = Field(2, ge=1, description="reader threads per slide (prefetch ahead of the encoder)")
    torch_threads: int | None = Field(None, ge=1, description="torch CPU threads per worker (default: split)")
    qc: bool = Field(True, description="write qc/<slide_id>.png")
    qc_size: int = Field(1024, ge=64, description="longest side of the QC image")

    @model_validator(mode="before")
    @classmethod
    def _roi_and_patch(cls, data: Any) -> Any:
        # One of roi_size / patch_size fixes the other (84 tokens per ROI need roi_size = 8 x patch_size).
        if isinstance(data, dict):
            if data.get("roi_size") is not None and data.get("patch_size") is None:
                data = {**data, "patch_size": max(1, int(data["roi_size"]) // 8)}
            elif data.get("patch_size") is not None and data.get("roi_size") is None:
                data = {**data, "roi_size": 8 * int(data["patch_size"])}
        return data

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        from msfm.data.tissue import TISSUE_PRESETS, TissueParams

        if self.roi_size != 8 * self.patch_size:
            msg = (
                f"roi_size={self.roi_size} with patch_size={self.patch_size} does not give ROAM's 84 tokens per ROI "
                f"(8x8 + 4x4 + 2x2 patches): roi_size must be 8 x patch_size, e.g. 2048/256 (ROAM) or 512/64."
            )
            raise MsfmInputError(msg)
        if self.tissue_preset not in TISSUE_PRESETS:
            msg = f"Unknown tissue preset {self.tissue_preset!r}; use one of {sorted(TISSUE_PRESETS)}."
            raise MsfmInputError(msg)
        if self.tissue_overrides:
            try:
                TissueParams(**{**TISSUE_PRESETS[self.tissue_preset].model_dump(), **self.tissue_overrides})
            except Exception as err:
                msg = f"tissue_overrides {self.tissue_overrides} are not valid TissueParams fields/values: {err}"
                raise MsfmInputError(msg) from err
        return self

    def tissue_params(self) -> Any:
        """The :class:`~msfm.data.tissue.TissueParams` of this config (preset plus overrides)."""
        from msfm.data.tissue import TISSUE_PRESETS

        preset = TISSUE_PRESETS[self.tissue_preset]
        return preset.model_copy(update=self.tissue_overrides) if self.tissue_overrides else preset

    def build_encoder(self) -> PatchEncoder:
        """The encoder this config names (on the CPU)."""
        return build_encoder(self.encoder, weights=self.weights, **self.encoder_options)

    def build_normalizer(self) -> Any:
        """The fitted stain normaliser, or ``None``."""
        from msfm.data.stain import build_normalizer

        return build_normalizer(self.stain_norm, self.stain_target)


def run_signature(config: PreprocessConfig, encoder: PatchEncoder, normalizer: Any) -> dict[str, Any]:
    """Everything that determines a slide's features: feature-relevant config fields, the encoder's signature
    (weights checksum, not location) and the fitted stain normaliser. Two runs with equal signatures write
    identical files, so a file with this signature is "done" on resume.
    """
    sig = {
        "pipeline_version": PIPELINE_VERSION,
        "config": {k: getattr(config, k) for k in _FEATURE_FIELDS},
        "encoder": encoder_signature(encoder.describe()),
        "stain": normalizer.to_dict() if normalizer is not None else None,
    }
    return json.loads(json.dumps(sig, sort_keys=True))  # the form it has after a round trip through a file
