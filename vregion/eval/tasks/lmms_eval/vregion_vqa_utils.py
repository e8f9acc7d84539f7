"""Hooks of the `vregion_vqa` lmms-eval task (see vregion_vqa.yaml)."""

import string

from PIL import Image


def doc_to_visual(doc):
    with Image.open(doc["image"]) as image:
        return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def normalise(text: str) -> str:
    """Lower case, no punctuation, no surrounding space: "Triangle." and "triangle" match."""
    return text.strip().lower().translate(str.maketrans("", "", string.punctuation)).strip()


def process_results(doc, results):
    return {"exact_match": float(normalise(results[0]) == normalise(doc["answer"]))}
