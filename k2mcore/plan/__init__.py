"""Analytic planners (pure python): what a layout costs before anything is launched."""
