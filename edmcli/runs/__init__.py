"""Run infrastructure shared by training, sampling and evaluation: run folders (``folder``),
atomic checkpoints (``checkpoint``), the process group (``distributed``), image grids
(``grids``), and the settings and loading of trained Γ-VAE and diffusion runs (``vae_run``,
``diffusion_run``). It imports models and data, never a stage."""
