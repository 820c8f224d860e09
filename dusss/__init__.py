"""DuSSS: Dual Semantic Similarity-Supervised VLM for semi-supervised medical image segmentation.

A thin library behind the notebooks: ``config`` (one dataclass, named profiles),
``sss`` (Eqs. 1-5), ``losses`` (Eqs. 6-17), ``data`` (readers, generators,
splits), ``vlm`` (Step 1), ``unet``/``ssmis`` (Step 2, the loop) and ``methods``
(Step 2, one module per method behind one registry), ``metrics``, ``plotting``,
``cam`` (activation maps) and ``runs`` (how a run is named, where it lives, which
VLM it reads). Apart from the library: the experiment harness ``experiments``
(grids, tables, the figures' runs, the benchmark) and the command line ``cli`` /
``commands``; the library imports neither.
"""
from . import methods  # noqa: F401  (fills the method registry the config checks ``method`` against)
from .data import registry  # noqa: F401  (fills the data-set registry: ``dataset`` and its folder name)

__version__ = "0.1.0"
