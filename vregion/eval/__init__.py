"""Measuring models: visual accuracy with a blind control, text skill, speed and size."""
