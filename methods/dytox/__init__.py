"""DyTox (Douillard et al., CVPR 2022): the network lives in `model.py`, its blocks in `blocks.py`; the method
(losses, training hooks, DyTox+ / DyTox++ presets) in `method.py`, `losses.py` and `sam.py`.

Importing this package registers the `dytox` method (the registry imports every package under methods/)."""
from methods.dytox.model import ContinualClassifier, DyTox, DyToxConfig, count_parameters
from methods.dytox.method import DyToxMethod  # noqa: E402  (registers "dytox")

__all__ = ["ContinualClassifier", "DyTox", "DyToxConfig", "DyToxMethod", "count_parameters"]
