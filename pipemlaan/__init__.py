"""pipemlaan: pipeline-parallel supervised local learning (MLAAN) for ResNets.

Entry points: `python -m pipemlaan.train` (alone or under torchrun).
"""

__version__ = "0.1.0"
