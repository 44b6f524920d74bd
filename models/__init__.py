"""NoduleAI models: phantoms, annotation readers, training, export and evaluation.

The detector itself (preprocessing, both stages, the manifests) lives in :mod:`pipelines`
(:mod:`pipelines.preprocess`, :mod:`pipelines.screen`, :mod:`pipelines.refine`,
:mod:`pipelines.manifest`, orchestrated by :class:`pipelines.detect.Detector`); this package
trains, exports and measures it with those same functions.

Torch-free: :mod:`models.phantom`, :mod:`models.annotations`, :mod:`models.evaluation`,
:mod:`models.evaluate`, :mod:`models.modelcards`, :mod:`models.realdata`.
Torch (``train`` extra only): :mod:`models.nets`, :mod:`models.train`, :mod:`models.export`.

Shipped weights: ``models/weights/stage1_screen.onnx`` and ``stage2_refine.onnx`` with their
manifests (``*.json``), and ``stage2_score.onnx`` (stage 2 cut to its probability output,
:func:`models.export.write_stage2_score`); model cards in ``models/cards/``.
"""
