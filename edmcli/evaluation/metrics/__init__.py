"""The metrics of the evaluation stage, pure functions on label maps, predictions, feature
arrays and images: segmentation (Dice, Hausdorff), classification, distribution distances
(Fréchet distance, KID, PRDC), diversity and rank correlation."""
