"""Recipes: the typed schema with the paper's defaults (`recipe`) and its value checking (`schema`)."""
