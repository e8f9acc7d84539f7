"""The visual region: score LLM layers (`scores`) and choose which ones to tune (`select`).

Nothing is re-exported, so importing the package costs nothing; import from the modules:
`from vregion.region.scores import score_layers`, `from vregion.region.select import select_layers`.
"""
