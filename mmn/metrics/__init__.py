"""Metrics: CLIPScore (:mod:`.clipscore`), BERTScore (:mod:`.bertscore`), receptive-field
IoU against COCO masks (:mod:`.iou`) and statistics (:mod:`.stats`).

Nothing is imported here on purpose: ``open_clip`` and ``bert_score`` are slow to import,
so import the submodule you need.
"""
