"""LoRA Studio web app. Importing it loads no torch."""
