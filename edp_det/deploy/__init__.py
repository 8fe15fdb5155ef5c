"""Deployment: model files (spec + state_dict), the inference form, latency measurement, export, benchmarking and the one timing protocol."""
