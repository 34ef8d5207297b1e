"""rvsepp: an RVSE++ image-text matching trainer built on the fused SelHN loss.

Command line: ``python -m rvsepp {extract-features,train,eval,demo}`` (also the
``rvsepp`` console script). Library entry points: :func:`rvsepp.train.train`,
:class:`rvsepp.config.TrainConfig`.
"""

__version__ = "0.1.0"
