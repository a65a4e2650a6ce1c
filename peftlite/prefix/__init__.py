"""Prefix tuning: a trained prefix of keys and values for every attention layer (Li & Liang 2021).

``encoder.py``: the :class:`PrefixEncoder` table/MLP; ``attach.py``: how a model gets one and
loses it; ``attention.py`` and ``hf_attention.py``: how attention modules read it.
"""

from .encoder import PrefixEncoder

__all__ = ["PrefixEncoder"]
