"""Training stages: `train-cls` (classifier) and `train-seg` (segmentation), on a shared small engine."""
