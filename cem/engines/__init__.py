"""Execution engines past one machine. Each engine runs the same pipeline pieces
(:meth:`cem.pipeline.Pipeline.measure`, :meth:`cem.pipeline.Pipeline.reason_many`) and writes the same records.

- :mod:`cem.engines.ray_engine`: Ray Data actor pools (``cem annotate --engine ray``; ``pip install 'cem[ray]'``).
"""
