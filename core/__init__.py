"""LoRA Studio headless core: data, templates, training, runs. Never imports gradio."""

__version__ = "0.1.0"
