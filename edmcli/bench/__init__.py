"""The throughput study (``echo-synth bench``): FLOPs, per-NFE and fixed costs, the linear cost
model of images/s against NFE, the ratios of the paper's section IV.C next to their FLOP
ceilings, our SPADE UNet against MONAI's at matched FLOPs, and the paper's Fig. 4."""
