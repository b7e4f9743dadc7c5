"""The reference runtime: runs the device schedule (preprocess, vision, prefill, decode) on a backend.

`python -m runtime.preprocess` and `python -m runtime.generate` are its command-line tools.
"""
