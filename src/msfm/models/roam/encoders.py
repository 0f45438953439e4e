"""Frozen patch encoders for ROAM: a registry of image models that turn 256 px patches into feature vectors.

An encoder and its preprocessing travel together (:class:`PatchEncoder`): ``preprocess`` takes the uint8 RGB
patches the slide pipeline produces (``[N, H, W, 3]``) and returns the normalised tensor the network expects, so a
feature file can always say exactly how it was made (:meth:`PatchEncoder.describe`).

Registered encoders:

* ``"resnet50_trunc"``: ResNet-50 cut after ``layer3`` + global average pooling, 1024-d. This is the encoder of the
  released ROAM checkpoints and of CLAM ("ImageNet" features). The network is written here in plain torch with
  torchvision's parameter names, so a torchvision ``resnet50`` state dict (``conv1.weight``, ``bn1.*``,
  ``layer1.0.conv1.weight``, ...) loads directly; ``layer4``/``fc`` are ignored. Weights come from a LOCAL file only
  (nothing is downloaded); without one the builder refuses unless ``random_init=True`` (speed tests only).
* ``"timm:<model>"``: any `timm <https://github.com/huggingface/pytorch-image-models>`_ model, if timm is installed,
  with local weights.
* ``"tiny"``: a seeded 3-layer conv net, 32-d. For tests: fast, deterministic, meaningless features.
* ``"colour_stats"``: weight-free handcrafted colour and texture statistics (64-d): RGB and optical-density means
  and spreads, a 2x2 spatial layout, grey-level quantiles and histogram, gradient and Laplacian energy. Not a
  learned representation; it is what runs when no pretrained weights are available (the offline demo).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from msfm.errors import MsfmInputError
from msfm.runtime.registry import Registry
from msfm.runtime.safe_load import load_torch_file, unwrap_state_dict

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PatchEncoder",
    "ResNet50Trunc",
    "available_encoders",
    "build_encoder",
    "encoder_signature",
    "load_torchvision_resnet_state_dict",
    "register_encoder",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Bump when an encoder's computation changes so old feature files stop counting as "done" on resume.
ENCODER_IMPL_VERSION = 1

EncoderBuilder = Callable[..., "PatchEncoder"]
_REGISTRY: Registry[EncoderBuilder] = Registry(
    "encoder", hint="Or 'timm:<model>'.", normalise=lambda name: str(name).strip().lower()
)


# ----------------------------------------------------------------------------------------------------------
# the wrapper
# ----------------------------------------------------------------------------------------------------------
class PatchEncoder(nn.Module):
    """A frozen image network plus the preprocessing it needs, as one module.

    The encoder is always in eval mode (BatchNorm uses running statistics, so a patch's features do not depend
    on the other patches of its batch) and has no trainable parameters.

    Args:
        backbone: Module mapping ``[N, 3, S, S]`` float images to ``[N, dim]`` (or ``[N, dim, 1, 1]``).
        name: Registry name (``"resnet50_trunc"``, ``"timm:vit_small_patch16_224"``, ...).
        dim: Feature dimension.
        input_size: Side ``S`` the patches are resized to before the network.
        mean: Per-channel mean subtracted from ``[0, 1]`` RGB.
        std: Per-channel std divided by.
        weights: Local weights file the backbone was loaded from (``None`` = no weights).
        init: How the weights were obtained (``"pretrained"``, ``"random(seed=0)"``, ``"weight-free"``).
        options: Builder keyword arguments (JSON-serialisable) that rebuild the same encoder.
        channels_last: Run the backbone in channels-last memory format (faster convolutions with oneDNN/cuDNN;
            same results up to float rounding).
        cpu_chunk: Patches per forward on the CPU in :meth:`encode` (large batches spill the CPU caches and run
            slower per patch; accelerators always get the whole batch). ``None`` = no chunking.

    Shape:
        - preprocess: uint8 ``[N, H, W, 3]`` -> float ``[N, 3, S, S]``
        - forward: ``[N, 3, S, S]`` -> ``[N, dim]``
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        name: str,
        dim: int,
        input_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        weights: str | os.PathLike[str] | None = None,
        init: str = "pretrained",
        options: Mapping[str, Any] | None = None,
        channels_last: bool = False,
        cpu_chunk: int | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.dim = int(dim)
        self.input_size = int(input_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.weights_path = str(Path(weights).resolve()) if weights is not None else None
        self.weights_sha256 = _sha256(weights) if weights is not None else None
        self.init = init
        self.options = dict(options or {})
        self.channels_last = bool(channels_last)
        self.cpu_chunk = int(cpu_chunk) if cpu_chunk else None
        if self.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        # Buffers (not parameters) so that .to(device) moves them and preprocessing can run on the GPU.
        self.register_buffer(
            "_mean", torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "_std", torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PatchEncoder:
        """Keep the encoder in eval mode whatever is asked: it is a frozen feature extractor."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the encoder's buffers."""
        return self._mean.device

    def preprocess(
        self, patches: np.ndarray | torch.Tensor, *, device: torch.device | None = None
    ) -> torch.Tensor:
        """Turn uint8 RGB patches into the normalised network input.

        The conversion runs on ``device`` (default: the encoder's), so only uint8 bytes cross to a GPU.

        Args:
            patches: uint8 RGB, ``[N, H, W, 3]`` or one ``[H, W, 3]`` patch (numpy or torch).
            device: Where to compute (default: the encoder's device).

        Returns:
            float32 ``[N, 3, S, S]``, resized (bilinear, antialiased) to ``input_size`` when ``H, W`` differ,
            scaled to ``[0, 1]`` and normalised with ``mean``/``std``.

        Raises:
            MsfmInputError: Not uint8, or not ``[..., 3]`` channels-last RGB.
        """
        t = patches
        if isinstance(patches, np.ndarray):
            arr = np.ascontiguousarray(patches)
            # Read-only arrays (np.asarray of a PIL image) make torch warn; they are only read, but copy anyway.
            t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        if not isinstance(t, torch.Tensor):
            msg = f"{self.name}.preprocess got {type(patches).__name__}; expected a uint8 numpy array or tensor."
            raise MsfmInputError(msg)
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.ndim != 4 or t.shape[-1] != 3:
            msg = (
                f"{self.name}.preprocess got an array of shape {tuple(t.shape)}; expected uint8 RGB patches "
                "[N, H, W, 3] (channels last, as read from a slide)."
            )
            raise MsfmInputError(msg)
        if t.dtype != torch.uint8:
            msg = (
                f"{self.name}.preprocess got dtype {t.dtype}; expected uint8 RGB (0-255). Convert with "
                "np.clip(x, 0, 255).astype(np.uint8) if your patches are floats in 0-255."
            )
            raise MsfmInputError(msg)
        dev = device if device is not None else self.device
        x = t.to(dev, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        s = self.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self._mean.to(dev)) / self._std.to(dev)
        return x.contiguous(
            memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed preprocessed patches.

        Shape:
            ``[N, 3, S, S]`` -> ``[N, dim]``
        """
        return self.backbone(x).flatten(1)

    @torch.inference_mode()
    def encode(
        self,
        patches: np.ndarray | torch.Tensor,
        *,
        device: torch.device | None = None,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """Preprocess and embed uint8 patches: one forward on an accelerator, ``cpu_chunk``-sized ones on the CPU.

        Args:
            patches: uint8 RGB ``[N, H, W, 3]`` (or one ``[H, W, 3]`` patch).
            device: Where to run (default: the encoder's device).
            chunk: Patches per forward (default: ``cpu_chunk`` on the CPU, all of them elsewhere).

        Returns:
            float ``[N, dim]`` on ``device``.

        Shape:
            uint8 ``[N, H, W, 3]`` -> ``[N, dim]``
        """
        dev = device if device is not None else self.device
        if chunk is None:
            chunk = self.cpu_chunk if dev.type == "cpu" else None
        n = int(patches.shape[0]) if patches.ndim == 4 else 1
        if not chunk or chunk >= n:
            return self(self.preprocess(patches, device=dev))
        return torch.cat(
            [self(self.preprocess(patches[i : i + chunk], device=dev)) for i in range(0, n, chunk)]
        )

    def embed(self, patches: np.ndarray | torch.Tensor, *, batch_size: int | None = None) -> np.ndarray:
        """Preprocess and embed uint8 patches; returns float32 ``[N, dim]`` as a numpy array.

        Shape:
            uint8 ``[N, H, W, 3]`` -> float32 ``[N, dim]``
        """
        return self.encode(patches, chunk=batch_size).float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        """What made the features: name, dim, input size, normalisation, weights file and its sha256.

        The dict is JSON-serialisable; feature files store it (``encoder_config``) so that a model can refuse
        features from another encoder.
        """
        return {
            "name": self.name,
            "dim": self.dim,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "weights": self.weights_path or "none",
            "weights_sha256": self.weights_sha256 or "none",
            "init": self.init,
            "options": self.options,
            "version": ENCODER_IMPL_VERSION,
        }


def encoder_signature(description: Mapping[str, Any]) -> dict[str, Any]:
    """The part of :meth:`PatchEncoder.describe` that determines the features (the weights' location is dropped).

    Two descriptions with equal signatures produce the same features, even if the weights file was moved.
    """
    return {k: v for k, v in description.items() if k != "weights"}


def _sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------
def register_encoder(name: str) -> Callable[[EncoderBuilder], EncoderBuilder]:
    """Decorator registering ``builder(*, weights=None, **kwargs) -> PatchEncoder`` under ``name``."""

    def deco(builder: EncoderBuilder) -> EncoderBuilder:
        try:
            return _REGISTRY.register(name, builder)
        except ValueError as err:
            raise MsfmInputError(str(err)) from None

    return deco


def available_encoders() -> list[str]:
    """Registered encoder names, plus the ``timm:<model>`` pattern."""
    return [*_REGISTRY.names(), "timm:<model>"]


def build_encoder(name: str, *, weights: str | os.PathLike[str] | None = None, **kwargs: Any) -> PatchEncoder:
    """Build a registered encoder (in eval mode, frozen, on the CPU).

    Args:
        name: A name from :func:`available_encoders` or ``"timm:<model>"``.
        weights: Local weights file (never downloaded).
        **kwargs: Builder options (``random_init``, ``seed``, ``input_size``, ...).

    Returns:
        The encoder.

    Raises:
        MsfmInputError: Unknown name, or the builder's own input errors (missing weights, wrong layout, ...).
    """
    if not isinstance(name, str) or not name.strip():
        msg = f"Encoder name must be a non-empty string; got {name!r}. Available: {available_encoders()}."
        raise MsfmInputError(msg)
    key = name.strip()
    if key.lower().startswith("timm:"):
        model_name = key.split(":", 1)[1].strip()
        if not model_name:
            msg = "Encoder 'timm:' needs a model name after the colon, e.g. 'timm:resnet50'."
            raise MsfmInputError(msg)
        return _build_timm(model_name, weights=weights, **kwargs)
    builder = _REGISTRY.get(key)
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            accepted = sorted(k for k in params if k != "weights")
            msg = f"Encoder {key!r} does not take the option(s) {unknown}; it accepts {accepted}."
            raise MsfmInputError(msg)
    return builder(weights=weights, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# weights files
# ----------------------------------------------------------------------------------------------------------
def _load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict from a local file with ``weights_only=True``; unwraps ``state_dict``/``model`` and
    strips a DataParallel ``module.`` prefix."""
    hint = "Pass a local state dict saved with torch.save(model.state_dict(), path)."
    obj = load_torch_file(path, what="encoder weights file", hint=hint)
    return unwrap_state_dict(obj, what=f"encoder weights file {str(path)!r}")


def load_torchvision_resnet_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "state dict"
) -> None:
    """Load the ``conv1``/``bn1``/``layer1-3`` part of a torchvision ResNet-50 state dict into ``model``.

    Other keys (``layer4``, ``fc``, ...) are ignored. Every parameter and running statistic the truncated
    network needs must be present with the right shape (``num_batches_tracked`` may be absent).

    Raises:
        MsfmInputError: Missing keys (listed), extra keys inside ``conv1/bn1/layer1-3`` (a deeper ResNet) or
            shape mismatches.
    """
    wanted = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.")
    expected = model.state_dict()
    picked = {k: v for k, v in state.items() if k.startswith(wanted)}
    missing = [k for k in expected if k not in picked and not k.endswith("num_batches_tracked")]
    layout = (
        "a torchvision ResNet-50 state dict (keys conv1.weight, bn1.weight, bn1.running_mean, "
        "layer1.0.conv1.weight, ..., layer3.5.bn3.running_var; layer4.*/fc.* are ignored)"
    )
    if missing:
        sample = sorted(state)[:5]
        shown = ", ".join(missing[:12]) + (f", ... ({len(missing)} in all)" if len(missing) > 12 else "")
        msg = (
            f"{source} is not in the expected layout: {len(missing)} of {len(expected)} keys of resnet50_trunc are "
            f"missing: {shown}. The file's first keys are {sample}. Expected {layout}. Convert other checkpoints "
            "to torchvision names first."
        )
        raise MsfmInputError(msg)
    extra = sorted(k for k in picked if k not in expected)
    if extra:
        msg = (
            f"{source} has keys that a ResNet-50 truncated after layer3 does not have: {extra[:8]}"
            f"{' ...' if len(extra) > 8 else ''}. Is it a deeper ResNet (101/152)? Expected {layout}."
        )
        raise MsfmInputError(msg)
    bad = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in picked.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad:
        msg = f"{source}: tensor shapes do not match ResNet-50: {bad[:6]}. Expected {layout}."
        raise MsfmInputError(msg)
    model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in picked.items()}, strict=False
    )


# ----------------------------------------------------------------------------------------------------------
# resnet50_trunc
# ----------------------------------------------------------------------------------------------------------
class _Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), torchvision parameter names."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50Trunc(nn.Module):
    """ResNet-50 up to ``layer3`` followed by global average pooling (1024-d), torchvision key names.

    Shape:
        ``[N, 3, H, W]`` -> ``[N, 1024]``
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self._inplanes = 64
        self.layer1 = self._make_layer(64, 3, stride=1)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 6, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():  # torchvision's init, for the random-weight (speed-only) variant
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes * _Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * _Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * _Bottleneck.expansion),
            )
        layers = [_Bottleneck(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes * _Bottleneck.expansion
        layers += [_Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.pool(x).flatten(1)


def _check_input_size(input_size: Any, *, name: str) -> int:
    if (
        isinstance(input_size, bool)
        or not isinstance(input_size, int | np.integer)
        or not 8 <= input_size <= 4096
    ):
        msg = (
            f"{name}: input_size must be an integer in [8, 4096]; got {input_size!r} (224 or 256 are usual)."
        )
        raise MsfmInputError(msg)
    return int(input_size)


@register_encoder("resnet50_trunc")
def _build_resnet50_trunc(
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    seed: int = 0,
    input_size: int = 224,
) -> PatchEncoder:
    """ImageNet ResNet-50 truncated after layer3 (1024-d), the ROAM/CLAM default.

    Args:
        weights: Local torchvision ``resnet50`` state dict (e.g. ``resnet50-11ad3fa6.pth``).
        random_init: Allow building without weights (random, seeded): for speed benchmarks only.
        seed: Seed of the random init.
        input_size: 224 (CLAM's current default; patches are resized) or 256 (ROAM's extractor: no resize).
    """
    input_size = _check_input_size(input_size, name="resnet50_trunc")
    if weights is None and not random_init:
        msg = (
            "Encoder resnet50_trunc needs ImageNet weights from a local file: pass weights=PATH (--weights PATH), "
            "a torchvision resnet50 state dict such as resnet50-11ad3fa6.pth or resnet50-19c8e357.pth. msfm "
            "downloads nothing. Without weights, use encoder 'colour_stats' (weight-free); random_init=True is "
            "for speed tests only (its features are meaningless). Where to download the weights: docs/weights.md "
            "or `msfm weights list`."
        )
        raise MsfmInputError(msg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = ResNet50Trunc()
    if weights is not None:
        load_torchvision_resnet_state_dict(
            net, _load_state_dict(weights), source=f"Weights file {str(weights)!r}"
        )
    init = "pretrained" if weights is not None else f"random(seed={int(seed)}; speed only)"
    options = {"input_size": input_size} | (
        {} if weights is not None else {"random_init": True, "seed": int(seed)}
    )
    return PatchEncoder(
        net,
        name="resnet50_trunc",
        dim=1024,
        input_size=input_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        weights=weights,
        init=init,
        options=options,
        channels_last=True,
        cpu_chunk=8,
    )


# ----------------------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------------------
def _build_timm(
    model_name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    input_size: int | None = None,
    **model_kwargs: Any,
) -> PatchEncoder:
    """Any timm model as a patch encoder (``num_classes=0``: pooled features), weights from a local file."""
    try:
        import timm
        import timm.data
    except ImportError as err:
        msg = (
            f"Encoder 'timm:{model_name}' needs the timm package, which is not installed ({err}). Install it with "
            "`pip install timm`. timm depends on torchvision: if your torch is a CUDA wheel, install torchvision "
            "from the same index as torch first (e.g. `pip install torchvision --index-url "
            "https://download.pytorch.org/whl/cu124`), otherwise pip may pull a torchvision built for another "
            "torch/CUDA and break the import. Encoders that need nothing extra: "
            f"{_REGISTRY.names()}."
        )
        raise MsfmInputError(msg) from err
    if weights is None and not random_init:
        msg = (
            f"Encoder 'timm:{model_name}' needs weights from a local file (--weights PATH, a state dict saved with "
            "torch.save); msfm downloads nothing. random_init=True builds it with random weights (speed tests only)."
        )
        raise MsfmInputError(msg)
    try:
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
    except Exception as err:  # unknown model names raise RuntimeError in timm
        msg = f"timm could not create {model_name!r}: {err}. List names with timm.list_models()."
        raise MsfmInputError(msg) from err
    if weights is not None:
        state = _load_state_dict(weights)
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys:
            msg = (
                f"Weights file {str(weights)!r} does not fit timm model {model_name!r}: missing keys "
                f"{result.missing_keys[:12]}{' ...' if len(result.missing_keys) > 12 else ''}."
            )
            raise MsfmInputError(msg)
        if result.unexpected_keys:
            logger.info(
                "timm:%s ignored %d keys of %s (e.g. a classifier head)",
                model_name,
                len(result.unexpected_keys),
                weights,
            )
    cfg = timm.data.resolve_data_config({}, model=model)
    size = int(input_size) if input_size is not None else int(cfg["input_size"][-1])
    size = _check_input_size(size, name=f"timm:{model_name}")
    options: dict[str, Any] = {"input_size": size, **model_kwargs}
    if weights is None:
        options["random_init"] = True
    return PatchEncoder(
        model,
        name=f"timm:{model_name}",
        dim=int(model.num_features),
        input_size=size,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        weights=weights,
        init="pretrained" if weights is not None else "random(timm init; speed only)",
        options=options,
        cpu_chunk=16,
    )


# ----------------------------------------------------------------------------------------------------------
# tiny (tests)
# ----------------------------------------------------------------------------------------------------------
class _TinyNet(nn.Module):
    """Three strided convs + global average pooling; for tests only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, dim, 3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


@register_encoder("tiny")
def _build_tiny(
    *, weights: str | os.PathLike[str] | None = None, seed: int = 0, input_size: int = 64
) -> PatchEncoder:
    """A seeded 32-d conv net for tests (deterministic, fast, features carry no meaning)."""
    input_size = _check_input_size(input_size, name="tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = _TinyNet(32)
    if weights is not None:
        net.load_state_dict(_load_state_dict(weights))
    return PatchEncoder(
        net,
        name="tiny",
        dim=32,
        input_size=input_size,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        weights=weights,
        init="pretrained" if weights is not None else f"random(seed={int(seed)})",
        options={"seed": int(seed), "input_size": input_size},
        cpu_chunk=32,
    )


# ----------------------------------------------------------------------------------------------------------
# colour_stats (weight-free)
# ----------------------------------------------------------------------------------------------------------
class ColourStats(nn.Module):
    """Handcrafted colour/texture statistics of RGB patches (no weights), 64 numbers per patch.

    Input is RGB in ``[0, 1]`` (the wrapper uses mean 0 and std 1). Per patch:

    ====  ==========================================================================================
    6     mean and std of R, G, B
    6     mean and std of optical density ``OD = -log((255 I + 1) / 256)`` per channel
    24    means of RGB and of OD in each cell of a 2x2 grid (spatial layout)
    5     grey-level quantiles 5, 25, 50, 75, 95 %
    5     grey histogram: fraction of pixels in 5 equal bins of ``[0, 1]``
    5     gradient energy ``mean(|dx| + |dy|)`` of grey, whole patch and each 2x2 cell
    3     gradient energy of R, G, B
    1     Laplacian energy ``mean(|lap|)`` of grey
    2     mean and std of HSV saturation
    2     fraction of near-white (grey > 0.8) and dark (grey < 0.3) pixels
    3     correlations of the OD channels (R-G, R-B, G-B)
    2     mean and std of total OD (sum over channels)
    ====  ==========================================================================================

    Shape:
        ``[N, 3, S, S]`` -> ``[N, 64]``
    """

    dim = 64

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = x.float().clamp(0.0, 1.0)
        od = -torch.log((x * 255.0 + 1.0) / 256.0)
        grey = x.mean(dim=1)  # [N, S, S]
        flat, od_flat, g_flat = x.flatten(2), od.flatten(2), grey.flatten(1)
        feats = [flat.mean(-1), flat.std(-1), od_flat.mean(-1), od_flat.std(-1)]
        h2, w2 = x.shape[-2] // 2, x.shape[-1] // 2
        cells = [(slice(0, h2), slice(0, w2)), (slice(0, h2), slice(w2, None))]
        cells += [(slice(h2, None), slice(0, w2)), (slice(h2, None), slice(w2, None))]
        feats += [x[..., r, c].mean(dim=(-2, -1)) for r, c in cells]
        feats += [od[..., r, c].mean(dim=(-2, -1)) for r, c in cells]
        q = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], device=x.device)
        feats.append(torch.quantile(g_flat, q, dim=1).T)
        bins = torch.clamp((g_flat * 5).long(), 0, 4)
        feats.append(F.one_hot(bins, 5).float().mean(1))
        dx = (grey[:, :, 1:] - grey[:, :, :-1]).abs()
        dy = (grey[:, 1:, :] - grey[:, :-1, :]).abs()
        grad = F.pad(dx, (0, 1)) + F.pad(dy, (0, 0, 0, 1))
        feats.append(grad.mean(dim=(1, 2)).unsqueeze(1))
        feats.append(torch.stack([grad[:, r, c].mean(dim=(1, 2)) for r, c in cells], dim=1))
        cdx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(-2, -1))
        cdy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean(dim=(-2, -1))
        feats.append(cdx + cdy)
        lap = (
            grey[:, 1:-1, 1:-1] * 4
            - grey[:, :-2, 1:-1]
            - grey[:, 2:, 1:-1]
            - grey[:, 1:-1, :-2]
            - grey[:, 1:-1, 2:]
        )
        feats.append(lap.abs().mean(dim=(1, 2)).unsqueeze(1))
        cmax, cmin = x.max(dim=1).values, x.min(dim=1).values
        sat = torch.where(cmax > 0, (cmax - cmin) / cmax.clamp_min(1e-6), torch.zeros_like(cmax)).flatten(1)
        feats.append(torch.stack([sat.mean(1), sat.std(1)], dim=1))
        feats.append(torch.stack([(g_flat > 0.8).float().mean(1), (g_flat < 0.3).float().mean(1)], dim=1))
        centred = od_flat - od_flat.mean(-1, keepdim=True)
        norm = centred.norm(dim=-1).clamp_min(1e-6)
        corr = [
            (centred[:, a] * centred[:, b]).sum(-1) / (norm[:, a] * norm[:, b])
            for a, b in ((0, 1), (0, 2), (1, 2))
        ]
        feats.append(torch.stack(corr, dim=1))
        total = od_flat.sum(1)
        feats.append(torch.stack([total.mean(1), total.std(1)], dim=1))
        out = torch.cat([f.reshape(n, -1) for f in feats], dim=1)
        if out.shape[1] != self.dim:  # guards the table above
            raise RuntimeError(f"colour_stats produced {out.shape[1]} features, expected {self.dim}")
        return out


@register_encoder("colour_stats")
def _build_colour_stats(
    *, weights: str | os.PathLike[str] | None = None, input_size: int = 128
) -> PatchEncoder:
    """Weight-free colour/texture statistics, 64-d (see :class:`ColourStats`). Patches are resized to
    ``input_size`` first (128 by default: the statistics barely change and the quantiles get 4x cheaper)."""
    if weights is not None:
        msg = f"Encoder colour_stats has no weights; got weights={str(weights)!r}. Drop --weights."
        raise MsfmInputError(msg)
    input_size = _check_input_size(input_size, name="colour_stats")
    return PatchEncoder(
        ColourStats(),
        name="colour_stats",
        dim=ColourStats.dim,
        input_size=input_size,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        init="weight-free",
        options={"input_size": input_size},
        cpu_chunk=16,
    )


def torch_threads_for(workers: int) -> int:
    """Intra-op torch threads per worker process when ``workers`` processes share this machine's cores."""
    return max(1, math.floor((os.cpu_count() or 1) / max(1, workers)))
