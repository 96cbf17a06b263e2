"""LoRA Studio headless core: data, templates, training, runs. Never imports gradio, webui or cli."""

if __name__ != "lorastudio.core":  # one module, one name: never a second copy as `core`
    raise ImportError(f"import lorastudio.core, not {__name__} (the checkout installs as lorastudio: pip install -e .)")

__version__ = "0.1.0"
