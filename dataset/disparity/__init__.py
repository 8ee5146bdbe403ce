"""The built-in, weight-free light-field disparity estimator and its per-scene cache.

Files by job: ``config.py`` (settings), ``cost_volume.py`` (plane sweep, matching cost, occlusion-robust
combination), ``filtering.py`` (box / guided / median filters), ``refinement.py`` (winner-takes-all +
sub-pixel), ``estimator.py`` (entry points), ``cache.py`` (maps written once per scene folder: the one
route by which training, evaluation, chat and ``scripts/estimate_disparity.py`` get an estimated map),
``cli.py`` and ``evaluate.py`` (the two scripts' code). See ``docs/DISPARITY.md``.
"""
