"""LISA's task mix: semantic segmentation, referring segmentation, VQA and reasoning segmentation.

Every task's dataset yields raw items of one contract (:mod:`dataset.tasks.base`), so one model-ready
wrapper (:class:`dataset.refer_seg.ReferSegDataset`) turns any of them into prompts, tokens and masks.
"""
