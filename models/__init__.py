"""NoduleAI models: phantoms, annotation readers, the two-stage detector, training and evaluation.

Torch-free (importable by the service): :mod:`models.phantom`, :mod:`models.annotations`,
:mod:`models.preprocessing`, :mod:`models.infer`, :mod:`models.evaluation`,
:mod:`models.evaluate`, :mod:`models.modelcards`.
Torch (``train`` extra only): :mod:`models.nets`, :mod:`models.train`, :mod:`models.export`.

Shipped weights: ``models/weights/stage1_screen.onnx`` and ``stage2_refine.onnx`` with their
manifests (``*.json``); model cards in ``models/cards/``.
"""
