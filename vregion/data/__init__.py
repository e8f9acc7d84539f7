"""Data: the synthetic visual QA generator, the text-skill set, LLaVA-format ingestion."""
