"""The measuring worlds: data where the truth is known, and what is measured on it.

- ``synthetic``: planted-concept worlds (each stream a different view of the same concepts, with a ceiling on
  how well one stream can agree with another);
- ``alignment``: one configuration trained on one planted world and measured against its ceiling and oracle;
- ``scenes``: rendered scenes of shapes and glyphs with captions, labels and instance masks (two families);
- ``towers``: small DINO-layout and CLIP-layout towers trained on scenes, saved in the real checkpoint formats;
- ``scenes_eval``: retrieval, localisation, attribution and naming tables on scenes, every row on the same pairs;
- ``demo``: the embedded default job (``sparc demo``).

The names below are imported on first use (PEP 562): importing the package loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_WHERE = {
    "run_demo": "demo",
    "PlantedConcepts": "synthetic",
    "write_synthetic": "synthetic",
    "SceneFamily": "scenes",
    "write_scenes": "scenes",
    "train_towers": "towers",
    "localisation_table": "scenes_eval",
    "retrieval_table": "scenes_eval",
}
__all__ = sorted(_WHERE)


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .demo import run_demo  # noqa: F401
    from .scenes import SceneFamily, write_scenes  # noqa: F401
    from .scenes_eval import localisation_table, retrieval_table  # noqa: F401
    from .synthetic import PlantedConcepts, write_synthetic  # noqa: F401
    from .towers import train_towers  # noqa: F401
