"""vregion: activate the visual region of an LLM for cheaper vision-language training and inference.

The library knows nothing of DVC, Prefect or Ray: stages/ and flows/ call it.
"""

__version__ = "0.1.0"
