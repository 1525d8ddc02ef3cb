"""Training subsets: seeded, nested, and stratified by cell class where asked (issue 31)."""

import numpy as np
import pytest

from equiseg.config import Config
from equiseg.data.datamodule import SegmentationDataModule, image_classes, training_subset
from equiseg.data.ocelot import OcelotFolder

FRACTIONS = [k / 20 for k in range(1, 21)]


def test_subsets_are_seeded_and_nest():
    for seed in range(5):
        subsets = [set(training_subset(20, f, seed)) for f in FRACTIONS]
        assert all(a <= b for a, b in zip(subsets, subsets[1:]))
        assert [len(s) for s in subsets] == list(range(1, 21))
    assert training_subset(20, 0.25, 3) == training_subset(20, 0.25, 3) != training_subset(20, 0.25, 4)


@pytest.mark.parametrize("seed", range(8))
def test_a_stratified_subset_holds_every_class_and_still_nests(seed):
    rng = np.random.default_rng(seed)
    # mostly single-class images, as in a small crowded training set; one image holds both classes
    classes = [{int(c)} for c in rng.integers(1, 3, 20)]
    classes[int(rng.integers(20))] = {1, 2}
    subsets = [set(training_subset(20, f, seed, classes)) for f in FRACTIONS]
    assert all(a <= b for a, b in zip(subsets, subsets[1:]))
    assert all(set().union(*(classes[i] for i in subset)) == {1, 2} for subset in subsets)  # even one image
    # no image holds both: two images do
    single = [{1 + k % 2} for k in range(20)]
    for f in FRACTIONS[1:]:
        assert set().union(*(single[i] for i in training_subset(20, f, seed, single))) == {1, 2}


def test_without_stratification_a_small_subset_can_miss_a_class():
    classes = [{1}] * 19 + [{2}]
    missed = [seed for seed in range(20) if 19 not in training_subset(20, 0.1, seed)]
    assert missed  # the unstratified draw leaves the only TC image out for some seeds
    assert all(19 in training_subset(20, 0.1, seed, classes) for seed in range(20))


def test_the_data_module_stratifies_when_the_config_asks(synthetic_small):
    from equiseg.training.fit import datamodule_for

    config = Config.from_dict({"data": {"root": str(synthetic_small), "stratify": True, "train_fraction": 0.5,
                                        "crop_size": None}})
    module = datamodule_for(config, synthetic_small, None)
    assert isinstance(module, SegmentationDataModule) and module.stratify
    folder = OcelotFolder(synthetic_small, "train")
    classes = image_classes(folder)
    picked = module.dataset("train").indices  # pyright: ignore[reportAttributeAccessIssue]
    assert picked == training_subset(len(folder), 0.5, config.train.seed, classes)
    assert set().union(*(classes[i] for i in picked)) == set().union(*classes)
