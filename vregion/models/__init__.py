"""Models: where an LVLM's parts live (`layer_map`), loading (`loading`), tiny random test models
(`tiny`), and the embedded default (`embedded`, `base`, `vision_pretrain`).

Nothing is re-exported here, so `vregion.models.layer_map` stays the module (not the function of
the same name) and importing the package costs nothing.
"""
