"""File-format primitives with no model knowledge: safetensors and torch-zip framing, safe
unpickling, atomic output directories."""
