"""Cells as points: found on probability maps (`peaks`), scored by the OCELOT 2023 rules
(`score`), and read and written in the official ``cell_classification.json`` format (`points_json`).
"""

from equiseg.detection.peaks import (
    BlockDetector,
    detect_cells,
    detection_halo,
    find_cells,
    peak_candidates,
    suppress_peaks,
)
from equiseg.detection.points_json import (
    IMAGE_SIDE,
    PointsFormatError,
    official_format_refusal,
    read_num_images,
    read_points_json,
    write_points_json,
)
from equiseg.detection.score import DISTANCE_CUTOFF, MatchOrder, detection_scores, match_counts

__all__ = ["DISTANCE_CUTOFF", "IMAGE_SIDE", "BlockDetector", "MatchOrder", "PointsFormatError", "detect_cells",
           "detection_halo", "detection_scores", "find_cells", "match_counts", "official_format_refusal",
           "peak_candidates", "read_num_images", "read_points_json", "suppress_peaks", "write_points_json"]
