"""Floor 6, the faces: the ``qdq`` command line and what only it uses.

- :mod:`~qdq.cli.commands`: the ``qdq`` command (``qdq demo``, ``qdq check``, ``qdq ptq``); ``main`` is the console
  entry point (``python -m qdq.cli`` runs it too);
- :mod:`~qdq.cli.demo`: ``qdq demo``, the whole journey on data that ships with scikit-learn;
- :mod:`~qdq.cli.zoo`: the models ``qdq ptq`` and the examples build by name, with their preprocessing;
- :mod:`~qdq.cli.plots`: PNG plots of a histogram's amax choices and of a sensitivity profile.

Importing this package imports neither torch nor any floor (``qdq --help`` answers at once).
"""

from qdq.cli.commands import main

__all__ = ["main"]
