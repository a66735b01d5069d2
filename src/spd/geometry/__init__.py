"""Pixel geometry shared by the data pipeline and the models (neither imports the other)."""
