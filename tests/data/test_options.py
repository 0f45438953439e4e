"""Reading options: one typed object per kind of data, unknown keys named with suggestions."""

from __future__ import annotations

import pytest

from msfm.data import CellReadOptions, SpatialReadOptions
from msfm.errors import MsfmInputError


def test_defaults_and_spatial_extends_cells() -> None:
    cells = CellReadOptions()
    assert (cells.layer, cells.pre_normalized, cells.min_panel_fraction) == (None, False, 0.01)
    spatial = SpatialReadOptions(scale=0.5)
    assert isinstance(spatial, CellReadOptions)
    assert (spatial.spatial_key, spatial.scale, spatial.min_panel_fraction) == ("spatial", 0.5, 0.5)


def test_unknown_keys_suggest_reading_options_and_verb_parameters() -> None:
    with pytest.raises(MsfmInputError, match=r"'layr' \(did you mean 'layer'\?\)"):
        CellReadOptions.parse({"layr": "counts"})
    with pytest.raises(MsfmInputError, match=r"'batchsize' \(did you mean 'batch_size'\?\)"):
        CellReadOptions.parse({"batchsize": 3}, verb_parameters=["batch_size", "device"])
    with pytest.raises(MsfmInputError, match="Invalid reading option species='rat'"):
        CellReadOptions.parse({"species": "rat"})
    with pytest.raises(MsfmInputError, match="Invalid reading option scale=-1"):
        SpatialReadOptions.parse({"scale": -1})
    assert SpatialReadOptions.parse({"duplicates": "jitter"}).duplicates == "jitter"
