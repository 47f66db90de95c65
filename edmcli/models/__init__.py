"""Networks and their maths: the Γ-VAE, the SPADE diffusion UNet, its preconditionings, the DDPM
model, classifier-free guidance and the losses.

Models know nothing of training, sampling, stores or the CLI; import the module you need
(``edmcli.models.gamma_vae``, ``edmcli.models.vae_loss``, ...).
"""
