"""Pixels into network input, the same in both stages: scaling to [0, 1] (`pixels`, `scaling`), the
stored views' geometry (`views`) and the student's strong augmentation and CutMix (`augment`)."""
