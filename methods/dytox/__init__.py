"""DyTox (Douillard et al., CVPR 2022): the network lives in `model.py`, its blocks in `blocks.py`.
The method (losses, training hooks) is added beside them."""
from methods.dytox.model import ContinualClassifier, DyTox, DyToxConfig, count_parameters

__all__ = ["ContinualClassifier", "DyTox", "DyToxConfig", "count_parameters"]
