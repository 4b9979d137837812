"""Moved to lightning_ste.recipes.data; shim removed at integration."""
