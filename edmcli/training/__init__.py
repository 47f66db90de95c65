"""The one training engine (``engine``) and the tasks that use it (``vae``, ...)."""
