"""Analysis: dense-vs-sparse comparison, sweeps, scaling forecasts, run diagnosis and reports."""
