"""LoRA Studio web app. The server process never loads torch, transformers or trl."""

if __name__ != "lorastudio.webui":  # one module, one name: never a second copy as `webui`
    raise ImportError(f"import lorastudio.webui, not {__name__} (the checkout installs as lorastudio: pip install -e .)")
