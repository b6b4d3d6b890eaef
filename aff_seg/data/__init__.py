"""Datasets, dataset mappers and synthetic data."""
