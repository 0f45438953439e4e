"""Model families, one subpackage each (``msfm.models.scfoundation``, ...).

Each family has ``config.py`` (what the network is), ``model.py`` (tensors in, output dataclass out),
``presets.py`` (named configs registered in :mod:`msfm.registry`) and ``convert.py`` (official
checkpoints to msfm names). Families never import each other; shared layers live in :mod:`msfm.nn`.
"""
