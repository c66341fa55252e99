"""Downstream evaluation of a backbone: fine-tuning, frozen-feature probes, results and reports."""
