"""boft_diffusion: Orthogonal Butterfly finetuning (BOFT) for diffusers pipelines."""

__version__ = "0.1.0"
