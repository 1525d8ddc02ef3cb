"""``equiseg study``: does equivariance beat augmentation when data is scarce?

A study trains every (variant, training fraction, seed) of its config (`config`), evaluates each model on
the test split (scores, rotation robustness, equivariance certificate, and test-time
augmentation for the plain variants), caches each result beside its run, and writes one
report. Finished runs and evaluations are reused, so an interrupted study resumes.

Study config (YAML)::

    name: study-small
    base: plain-small                       # data, train and detect settings shared by all runs
    overrides: [data.synthetic.size=256]    # applied to the base
    reference_width: 8                      # plain width whose parameter count the others match
    variants:                               # label -> family (+ augmentation preset, + width)
      plain: {family: plain, augment: none}
      plain+heavy: {family: plain, augment: heavy}
      isotropic: {family: isotropic}
      isotropic+ctx: {family: isotropic, context: model}   # + tissue context (see below)
      c8+blur: {family: c8, pool: blur}       # anti-aliased downsampling (model.pool)
    tissue: [model.family=p4m, model.width=4]  # overrides of the base for the tissue model
    fractions: [0.25, 1.0]
    train_images: [2, 8, 32]                # instead of fractions: that many training images
    seeds: [0, 1, 2]
    equal_steps: true                       # epochs / fraction, so every fraction gets the same steps
    lr_search: [3.0e-4, 1.0e-3, 3.0e-3]     # each variant's learning rate, chosen on the validation split
                                            # (or a variant's own ``lr: 0.01``, a rate fixed by a stated rule)
    baseline: plain+heavy                   # every other variant against it, paired, with bootstrap intervals
    robustness: true                        # rotation robustness and TTA (false: scores and certificate only)
    angles: [15, 30, 45]
    gc_input: /data/ocelot/gc_input         # optional: a real Grand Challenge input folder

``base`` is a preset name (``equiseg presets``), a YAML file beside the study config, or any
path to one; the study config itself (``equiseg study -c``) is a preset name or a path too.

The equivariance certificate is also measured on a real OCELOT patch when a Grand Challenge
input folder (``images/{cell,tissue}_patches``, ``metadata.json``) is given: by the study
config's ``gc_input`` key, else by the environment variable ``EQUISEG_GC_INPUT``; a folder
given that is not there is an error. Without either the certificate covers the test images only.

Fairness and convergence: with ``lr_search``, each variant without a rate of its own (``lr``)
first trains once per rate (the largest training set, the first seed, into ``runs/_lr``) and
takes the rate whose best validation loss is lowest, for all its runs (a variant's own ``lr``
is used as stated, not searched; the search's run at the chosen rate is the same config as the
variant's cell at the largest training set and first seed, and is copied there, not trained
again); the base's ``train.early_stopping`` and ``train.schedule`` (see the run config) stop
each run at its plateau, within ``epochs`` (times 1 / fraction with ``equal_steps``). The report gives each run's best epoch and flags runs
whose best epoch was their last (not converged).

Statistics: every variant is compared with ``baseline`` at each training set, paired (same
seed, same data subset, same test images), by a bootstrap over seeds and test images
(`equiseg.evaluation.bootstrap`); a verdict only where the 95 % interval excludes 0.

Variants with ``context`` (``truth`` or ``model``, as ``data.context``) get the tissue-class
maps of one tissue model as extra input; that model is trained first (``task: tissue``, the
base with the ``tissue`` overrides, the full training split, seed 0) into ``runs/_tissue``.
Context variants take the width of their family (only the first conv grows) and are evaluated
with the tissue model's predictions, and also with the ground-truth tissue mask ("oracle").
"""

from equiseg.study.config import GC_INPUT_ENV, StudyConfig, Variant, matched_widths, real_samples
from equiseg.study.evaluation import evaluate_study_run, evaluate_tissue
from equiseg.study.runner import run_study, study_data, train_and_evaluate

__all__ = ["GC_INPUT_ENV", "StudyConfig", "Variant", "evaluate_study_run", "evaluate_tissue", "matched_widths",
           "real_samples", "run_study", "study_data", "train_and_evaluate"]
