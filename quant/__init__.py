"""int4 quantisation: calibration, AWQ search, scale folding, format-neutral codes every exporter writes."""
