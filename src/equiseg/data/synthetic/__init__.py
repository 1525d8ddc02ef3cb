"""The built-in synthetic data: one procedural H&E-like world (`world`), seen as OCELOT patch pairs
(`patches`) and as whole slides (`slide`).

Both generators draw from the same public world API: a `World` of tissue fields and nuclei in
continuous µm, placed by `place_nuclei`, rendered into any `View` by `render` and coloured by
`colour`. `equiseg synth` writes patch datasets, `equiseg synth-slide` pyramidal slides.
"""

from equiseg.data.synthetic.patches import DEFAULT_COUNTS, SyntheticPair, check_size, generate_dataset, render_pair
from equiseg.data.synthetic.world import CELL_MPP, SCALE, NucleusKind

__all__ = ["CELL_MPP", "DEFAULT_COUNTS", "SCALE", "NucleusKind", "SyntheticPair", "check_size", "generate_dataset",
           "render_pair"]
