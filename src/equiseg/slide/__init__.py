"""``equiseg slide``: cells (and tissue) on whole-slide images, as files a pathologist opens in QuPath.

A slide goes through in four steps, each in bounded memory whatever its size:

1. **Where**: the tissue on the glass, from a low-resolution read (`find_tissue`);
   windows with no tissue under them are not run, and no cell off the tissue is reported.
2. **Tissue** (a tissue model, when given): the slide at the tissue model's training
   resolution (``Run.resolution``: OCELOT's tissue patches are about 0.8 µm/px), in
   overlapping tiles blended as ``equiseg predict`` blends them; the probabilities are kept in
   a float16 file for step 3 and drawn as tissue-class polygons.
3. **Cells**: the slide at the cell model's resolution (about 0.2 µm/px), streamed in blocks of
   overlapping tiles (`stream_blocks`) and read by the
   block detector (`BlockDetector`), exactly as
   ``equiseg predict`` reads one large image: so the cells of a region equal ``predict``'s on the
   same region cut out at that resolution, and each cell is reported once, however the tiles
   fall. A cell model with tissue context takes, for each tile, its block of step 2's
   probabilities resampled onto its grid: the geometry of an OCELOT pair
   (`tissue_crop`).
4. **Outputs**, in level-0 pixels of the slide (see `SlideOutputs`).

Modules: `models` (a model with its resolution), `passes` (steps 2 and 3), `qupath` (step 4),
`analyse` (one slide, then many, here), `distributed` (many over DDP processes). The slide itself
is read through `equiseg.data.wsi`.

A slide interrupted in step 3 resumes from the last block row it finished (``--resume``);
slides whose outputs are complete are skipped.
"""

from equiseg.slide.analyse import SlideCells, analyse_slide, analyse_slides, check_slides, parse_region
from equiseg.slide.distributed import analyse_slides_distributed
from equiseg.slide.models import SlideModel, load_slide_models
from equiseg.slide.passes import TissueMap, stripes
from equiseg.slide.qupath import CELL_NAMES, TISSUE_NAMES, SlideOutputs

__all__ = ["CELL_NAMES", "TISSUE_NAMES", "SlideCells", "SlideModel", "SlideOutputs", "TissueMap", "analyse_slide",
           "analyse_slides", "analyse_slides_distributed", "check_slides", "load_slide_models", "parse_region",
           "stripes"]
